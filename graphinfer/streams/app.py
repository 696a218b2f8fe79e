"""The Faust application: the request and replay agents and the worker's runtime.

The agent reads raw bytes (never a Record-typed topic, which crashes the
agent on undecodable input), takes batches without Faust's automatic acks,
and acknowledges a batch only after :class:`BatchProcessor` has stored its
outcomes and delivered its replies. An exception or a cancellation inside
the batch therefore leaves the batch unacknowledged, and the broker
redelivers it to whichever worker owns the partition next.

The runtime also runs the replay coordinator (:mod:`graphinfer.replay.coordinator`),
which publishes scheduled runs to the replay topic when this worker leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, cast

import asyncpg
import faust
from faust.types import TP

from graphinfer import metrics, tracing
from graphinfer.models.decode import Limits
from graphinfer.models.pool import InferencePool, PoolOptions
from graphinfer.models.repository import ModelCatalog, scan
from graphinfer.replay.coordinator import ReplayCoordinator
from graphinfer.settings import Settings
from graphinfer.storage.db import Database
from graphinfer.storage.deployments import HEARTBEAT_INTERVAL_S
from graphinfer.storage.replay import ReplayStore
from graphinfer.storage.retention import RETENTION_LOCK_KEY, RetentionPeriods, purge
from graphinfer.streams.broker_watch import BrokerWatch
from graphinfer.streams.driver import (
    ConsumerPause,
    describe_partitions,
    effective_fetch_max_wait_ms,
    transport_class,
)
from graphinfer.streams.priority import OnlineFirst
from graphinfer.streams.processor import BatchProcessor, Message, ServedModels, Topics

logger = logging.getLogger(__name__)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_message_bytes=settings.max_message_bytes,
        max_nodes=settings.max_nodes,
        max_edges=settings.max_edges,
        max_targets=settings.max_targets,
    )


def worker_name(settings: Settings) -> str:
    return f"{settings.app_id}@{socket.gethostname()}:{os.getpid()}"


class WorkerRuntime:
    """The models, the inference pool and the database that the agent needs besides Faust.

    Models reload on ``GRAPHINFER_MODEL_RELOAD_INTERVAL_S`` and on SIGHUP: the
    repository is scanned off the event loop, a new pool loads the new set,
    and the processor switches to it in one assignment. Batches already
    running finish on the pool they started with, which then closes. A
    version that fails its checks or does not load is left out, so the
    version before it keeps serving.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = worker_name(settings)
        self.database: Database | None = None
        self.processor: BatchProcessor | None = None
        self.models: ServedModels | None = None
        self._reload_requested = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        # Where consumption started on each partition at its latest assignment.
        self.start_offsets: dict[tuple[str, int], int] = {}
        self._app: GraphinferApp | None = None

    def _pool_options(self) -> PoolOptions:
        settings = self.settings
        return PoolOptions(
            processes=settings.pool_processes,
            timeout_s=settings.model_timeout_s,
            memory_limit_mb=settings.pool_memory_limit_mb,
            trusted_sha256=settings.model_trusted_sha256,
            limits=limits_from(settings),
        )

    def _scan(self) -> ModelCatalog:
        settings = self.settings
        return scan(
            settings.model_repository,
            model_paths=settings.model_paths,
            trusted_sha256=settings.model_trusted_sha256,
            pinned=settings.model_versions,
            keep_previous=settings.model_keep_previous,
        )

    async def _load(self, catalog: ModelCatalog) -> ServedModels:
        metrics.MODELS_REFUSED.set(len(catalog.refusals))
        pool = InferencePool(catalog.entries(), self._pool_options())
        loaded = await pool.start()
        return ServedModels(catalog=catalog.restricted(loaded), pool=pool)

    async def start(self, app: GraphinferApp) -> None:
        settings = self.settings
        self._app = app
        metrics.watch_lag(self.consumer_lag)
        tracing.configure("graphinfer-worker")
        port = metrics.serve(settings.worker_metrics_host, settings.worker_metrics_port)
        logger.info("metrics served url=http://%s:%d/metrics", settings.worker_metrics_host, port)
        self.database = await Database.connect(
            settings.dsn,
            min_size=settings.database_pool_min_size,
            max_size=settings.database_pool_max_size,
            timeout_s=settings.database_connect_timeout_s,
        )
        self.models = await self._load(await asyncio.to_thread(self._scan))
        self._log_serving(None, self.models.catalog)
        await self._record_deployments()
        logger.info(
            "inference pool ready processes=%d pids=%s", settings.pool_processes, self.models.pool.pids
        )

        self.processor = BatchProcessor(
            database=self.database,
            models=self.models,
            send=app.send_raw,
            topics=Topics(
                requests=settings.request_topic,
                replay=settings.replay_topic,
                predictions=settings.prediction_topic,
                replies=settings.reply_topic,
                dead_letters=settings.dead_letter_topic,
            ),
            limits=limits_from(settings),
            default_models=settings.default_models,
            retry_max_delay_s=settings.batch_retry_max_delay_s,
            flow=ConsumerPause(app),
            raise_after_messages=settings.fault_injection_raise_after_messages,
        )
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        self._tasks = [
            asyncio.create_task(self._reload_loop(), name="graphinfer-model-reload"),
            asyncio.create_task(self._heartbeat_loop(), name="graphinfer-deployment-heartbeat"),
            asyncio.create_task(self._retention_loop(), name="graphinfer-retention"),
        ]
        if settings.kafka_topic_check_interval_s > 0:
            processor = self.processor
            watch = BrokerWatch(settings, lambda: processor.finished)
            self._tasks.append(asyncio.create_task(watch.run(), name="graphinfer-broker-watch"))
        coordinator = ReplayCoordinator(settings, ReplayStore(self.database.pool), self.name)
        self._tasks.append(asyncio.create_task(coordinator.run(), name="graphinfer-replay-coordinator"))

    def consumer_lag(self) -> list[tuple[str, int, int]]:
        """Return (topic, partition, lag) for every assigned partition with a known high watermark.

        Runs on the metrics server's thread. The high watermark is the one
        the last fetch response carried. The next offset to finish is one
        past the last offset this worker finished on the partition, or where
        consumption started when nothing was finished since the assignment.
        """
        app, processor = self._app, self.processor
        if app is None:
            return []
        finished = dict(processor.finished) if processor is not None else {}
        starts = dict(self.start_offsets)
        rows = []
        try:
            assigned = sorted(app.consumer.assignment())
        except Exception:  # the consumer is not started, or stopping
            return []
        topics = {self.settings.request_topic, self.settings.replay_topic}
        for tp in assigned:
            # Faust's own leader topic is assigned too; it carries no requests.
            if tp.topic not in topics:
                continue
            key = (tp.topic, tp.partition)
            try:
                highwater = app.consumer.highwater(tp)
            except Exception:  # revoked since assignment() was read
                continue
            done = finished.get(key)
            # A partition reassigned after another worker had it may have an
            # older finished offset than where consumption restarted.
            next_offsets = [
                offset
                for offset in (starts.get(key), None if done is None else done + 1)
                if offset is not None
            ]
            if highwater is None or not next_offsets:
                continue
            rows.append((tp.topic, tp.partition, max(0, highwater - max(next_offsets))))
        return rows

    async def record_start_offsets(self, app: GraphinferApp, assigned: set[TP]) -> None:
        """Remember where consumption starts on newly assigned partitions, for :meth:`consumer_lag`."""
        for tp in assigned:
            try:
                position = await asyncio.wait_for(app.consumer.position(tp), timeout=30)
            except Exception as exc:
                logger.debug("could not read the position partition=%s error=%r", tp, exc)
                continue
            if position is not None:
                self.start_offsets[tp.topic, tp.partition] = position

    async def reload(self) -> bool:
        """Scan the repository and switch to a new pool when the models changed; return whether it did."""
        async with self._reload_lock:
            assert self.models is not None and self.processor is not None
            try:
                catalog = await asyncio.to_thread(self._scan)
            except OSError as exc:
                logger.error("model reload failed, keeping the loaded models error=%r", exc)
                return False
            metrics.MODELS_REFUSED.set(len(catalog.refusals))
            if catalog.fingerprint() == self.models.catalog.fingerprint():
                return False
            new = await self._load(catalog)
            old, self.models = self.models, new
            # One assignment: a batch reads processor.models once, at its start.
            self.processor.models = new
            self._log_serving(old.catalog, new.catalog)
            await self._record_deployments()
            await old.pool.close()
            return True

    async def _reload_loop(self) -> None:
        interval = self.settings.model_reload_interval_s or None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload_requested.wait(), timeout=interval)
            self._reload_requested.clear()
            try:
                await self.reload()
            except Exception:
                logger.exception("model reload failed, keeping the loaded models")

    async def _heartbeat_loop(self) -> None:
        while True:
            # The gateway treats a worker whose heartbeat is older than 60 s as gone.
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            assert self.database is not None
            try:
                await self.database.heartbeat_deployments(self.name)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("deployment heartbeat failed error=%r", exc)

    async def _retention_loop(self) -> None:
        settings = self.settings
        periods = RetentionPeriods(
            requests_days=settings.retention_requests_days,
            predictions_days=settings.retention_predictions_days,
            dead_letters_days=settings.retention_dead_letters_days,
        )
        while True:
            assert self.database is not None
            try:
                async with self.database.pool.acquire() as connection, connection.transaction():
                    # One worker of the deployment cleans up at a time; the others skip this round.
                    if await connection.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK_KEY):
                        await purge(connection, periods)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("retention clean-up failed, retrying next round error=%r", exc)
            await asyncio.sleep(settings.retention_interval_s)

    async def _record_deployments(self) -> None:
        assert self.database is not None and self.models is not None
        catalog = self.models.catalog
        serving = {entry.ref for entry in catalog.serving()}
        await self.database.record_deployments(
            self.name,
            [
                {
                    "model": entry.name,
                    "version": entry.version,
                    "sha256": entry.manifest.sha256,
                    "task": entry.manifest.task,
                    "manifest": entry.manifest.model_dump(mode="json"),
                    "serving": entry.ref in serving,
                }
                for entry in catalog.entries()
            ],
        )

    def _log_serving(self, old: ModelCatalog | None, new: ModelCatalog) -> None:
        if not len(new):
            logger.warning(
                "no model is served: %s holds no valid model (GRAPHINFER_MODEL_REPOSITORY); every "
                "request will be answered no_model_selected",
                self.settings.model_repository,
            )
        before = {entry.ref for entry in old.entries()} if old is not None else set()
        after = {entry.ref for entry in new.entries()}
        serving = {entry.ref for entry in new.serving()}
        for ref in sorted(after - before):
            logger.info("model loaded model=%s serving=%s", ref, ref in serving)
        for ref in sorted(before - after):
            logger.info("model unloaded model=%s", ref)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.models is not None:
            await self.models.pool.close()
        if self.database is not None:
            try:
                await self.database.record_deployments(self.name, [])
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("could not remove this worker's model_deployments rows error=%r", exc)
            await self.database.close()
        # Off the event loop: the last export may wait for the collector up to its timeout.
        await asyncio.to_thread(tracing.shutdown)


class GraphinferApp(faust.App):
    """A Faust app with graphinfer's transport and runtime."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        self.settings = settings
        self.runtime = WorkerRuntime(settings)
        self.online_first = OnlineFirst(replay_share=settings.replay_share)
        self._transport_cls = transport_class(settings.kafka_fetch_max_wait_ms)
        super().__init__(settings.app_id, **options)
        self.assignments = 0
        self._stopping = False
        # Held here so that a running task is not garbage-collected.
        self._start_offsets_tasks: set[asyncio.Task[None]] = set()
        self.on_partitions_assigned.connect(self._log_assignment)

    def _new_transport(self) -> Any:
        return self._transport_cls(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Any:
        return self._transport_cls(self.conf.broker_producer, self)

    async def on_first_start(self) -> None:
        await super().on_first_start()
        await self.runtime.start(self)

    async def on_started(self) -> None:
        await super().on_started()
        logger.info(
            "worker started name=%s fetch_max_wait_ms=%s session_timeout_s=%s",
            self.runtime.name,
            effective_fetch_max_wait_ms(self),
            self.conf.broker_session_timeout,
        )

    async def on_stop(self) -> None:
        self._stopping = True
        await super().on_stop()
        await self.runtime.stop()
        logger.info("worker stopped name=%s %s", self.runtime.name, metrics.summary())

    async def _consumer_wait_empty(self, consumer: Any, log: Any) -> None:
        # Faust waits, with no limit, for every message the agents took before
        # it commits, also at shutdown. A batch held by a database outage would
        # then keep a stopping worker alive until the outage ends, so the wait
        # at shutdown is bounded. Messages left unfinished stay uncommitted,
        # and the next owner of their partitions processes them.
        # NOTE: faust-streaming 0.15.3 swallows the cancellation of its own
        # wait, so the bound polls its set of unacknowledged messages, a
        # private attribute of the pinned version.
        timeout = self.settings.shutdown_timeout_s
        if not self._stopping or timeout <= 0:
            await super()._consumer_wait_empty(consumer, log)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while _unfinished(consumer) and loop.time() < deadline:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.1)
        unfinished = _unfinished(consumer)
        if not unfinished:
            await super()._consumer_wait_empty(consumer, log)
            return
        logger.warning(
            "stopping with %d messages not finished after %.0f s (GRAPHINFER_SHUTDOWN_TIMEOUT_S); "
            "they are not committed, so the next worker to own their partitions processes them",
            unfinished,
            timeout,
        )
        await consumer.commit()

    def _log_assignment(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned: set[TP] = args[0] if args else set()
        # Every assignment after the first is a rebalance: a member joined or
        # left, or this one was evicted and rejoined.
        self.assignments += 1
        metrics.ASSIGNMENTS.inc()
        # Not awaited here: the position of a new partition is known only
        # once the rebalance that runs this callback has finished.
        task = asyncio.get_running_loop().create_task(
            self.runtime.record_start_offsets(self, set(assigned)), name="graphinfer-start-offsets"
        )
        self._start_offsets_tasks.add(task)
        task.add_done_callback(self._start_offsets_tasks.discard)
        logger.info(
            "partitions assigned assignment=%d rebalances=%d generation=%s partitions=%s",
            self.assignments,
            self.assignments - 1,
            self.consumer_generation_id,
            describe_partitions(assigned),
        )

    async def send_raw(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        headers: list[tuple[str, bytes]],
    ) -> Any:
        """Schedule one message on the app's producer; await the result for delivery."""
        return await self.producer.send(topic, key, value, partition, None, headers)


def _unfinished(consumer: Any) -> int:
    """Return how many messages the agents took and have not acknowledged yet."""
    return sum(1 for message in list(getattr(consumer, "_unacked_messages", ())) if not message.acked)


def create_app(settings: Settings) -> GraphinferApp:
    """Build the worker app; its agent consumes the request topic in batches."""
    credentials = None
    if settings.kafka_sasl_mechanism:
        credentials = faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value()
            if settings.kafka_sasl_password
            else None,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=settings.kafka_client_options().get("ssl_context"),
        )
    faust_root = Path(tempfile.gettempdir()) / "graphinfer-faust"
    faust_root.mkdir(exist_ok=True)
    app = GraphinferApp(
        settings,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        broker_credentials=credentials,
        # The worker serves no HTTP; Faust's web server would bind port 6066
        # on every interface and collide with a second worker on the host.
        web_enabled=False,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_max_poll_interval=settings.kafka_max_poll_interval_s,
        broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_s / 3.0),
        broker_commit_interval=0.5,
        consumer_auto_offset_reset="earliest",
        topic_allow_declare=False,
        topic_disable_leader=False,
        producer_acks=-1,
        producer_max_request_size=max(1_048_576, settings.max_message_bytes + 65_536),
        stream_buffer_maxsize=max(settings.stream_buffer_maxsize, settings.batch_max_size * 4),
        store="memory://",
        # Faust creates its data directory at start; graphinfer keeps no state
        # there (no tables), so it goes to the temporary directory, not the cwd.
        datadir=str(faust_root / "{conf.name}-data"),
        **_metadata_age(settings),
    )
    request_topic = app.topic(settings.request_topic, key_serializer="raw", value_serializer="raw")
    batch_wait_s = settings.batch_max_wait_ms / 1000.0 or 0.001

    @app.agent(request_topic, name="graphinfer.infer")
    async def infer(stream: faust.StreamT) -> None:
        await _process_batches(app, stream, settings.batch_max_size, batch_wait_s, online=True)

    # Replayed requests have their own agent, so an online request never
    # queues behind a replay backlog; OnlineFirst makes replayed batches
    # yield to online ones in the event loop and the pool.
    replay_topic = app.topic(settings.replay_topic, key_serializer="raw", value_serializer="raw")

    @app.agent(replay_topic, name="graphinfer.replay", concurrency=1)
    async def replay(stream: faust.StreamT) -> None:
        await _process_batches(app, stream, settings.replay_batch_max_size, batch_wait_s, online=False)

    return app


async def _process_batches(
    app: GraphinferApp, stream: faust.StreamT, size: int, wait_s: float, *, online: bool
) -> None:
    # noack_take (faust-streaming 0.15) yields events and leaves acking to
    # the caller; StreamT does not declare it, hence the cast.
    batches = cast(faust.Stream, stream).noack_take(size, within=wait_s)
    async for events in batches:
        processor = app.runtime.processor
        assert processor is not None, "the worker runtime starts before the agent"
        messages = [_message(event) for event in events]
        if online:
            async with app.online_first.online_batch():
                await processor.process(messages)
        else:
            for step in app.online_first.replay_steps(messages):
                async with app.online_first.replay_step(len(step)):
                    await processor.process(step)
        for event in events:
            await stream.ack(event)


def _metadata_age(settings: Settings) -> dict[str, int]:
    # A topic the broker lost and the broker watch created again is assigned
    # only once the consumer's metadata is refreshed, and Faust's default age
    # is five minutes. Three check intervals leave the watch time to see a
    # lost topic before the consumer's own metadata request recreates it.
    if settings.kafka_topic_check_interval_s <= 0:
        return {}
    return {"consumer_metadata_max_age_ms": max(5000, int(settings.kafka_topic_check_interval_s * 3000))}


def _message(event: Any) -> Message:
    message = event.message
    tp: TP = message.tp
    headers = message.headers
    if isinstance(headers, dict):
        header_map = {str(name): bytes(value) for name, value in headers.items() if value is not None}
    else:
        header_map = {str(name): bytes(value) for name, value in (headers or ()) if value is not None}
    return Message(
        topic=tp.topic,
        partition=tp.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=header_map,
    )
