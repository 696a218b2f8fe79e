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
import logging
import os
import socket
from typing import Any, cast

import faust
from faust.types import TP

from graphinfer.models.decode import Limits
from graphinfer.models.pool import InferencePool
from graphinfer.models.repository import ModelCatalog, scan
from graphinfer.replay.coordinator import ReplayCoordinator
from graphinfer.settings import Settings
from graphinfer.storage.db import Database
from graphinfer.storage.replay import ReplayStore
from graphinfer.streams.driver import effective_fetch_max_wait_ms, transport_class
from graphinfer.streams.priority import OnlineFirst
from graphinfer.streams.processor import BatchProcessor, Message, Topics

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
    """What the agent needs besides Faust: the models, the pool and the database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = worker_name(settings)
        self.catalog: ModelCatalog | None = None
        self.pool: InferencePool | None = None
        self.database: Database | None = None
        self.processor: BatchProcessor | None = None
        self.replay_task: asyncio.Task[None] | None = None

    async def start(self, app: GraphinferApp) -> None:
        settings = self.settings
        self.catalog = scan(
            settings.model_repository,
            model_paths=settings.model_paths,
            trusted_sha256=settings.model_trusted_sha256,
            pinned=settings.model_versions,
        )
        if not len(self.catalog):
            logger.warning(
                "no model is served: %s holds no valid model (GRAPHINFER_MODEL_REPOSITORY); every "
                "request will be answered no_model_selected",
                settings.model_repository,
            )
        for entry in self.catalog.serving():
            logger.info(
                "model serving model=%s version=%d sha256=%s",
                entry.name,
                entry.version,
                entry.manifest.sha256[:12],
            )

        self.database = await Database.connect(
            settings.dsn,
            min_size=settings.database_pool_min_size,
            max_size=settings.database_pool_max_size,
            timeout_s=settings.database_connect_timeout_s,
        )
        serving = {entry.ref for entry in self.catalog.serving()}
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
                for entry in self.catalog.entries()
            ],
        )

        self.pool = InferencePool(
            self.catalog.entries(),
            processes=settings.pool_processes,
            timeout_s=settings.model_timeout_s,
            trusted_sha256=settings.model_trusted_sha256,
            limits=limits_from(settings),
        )
        self.pool.start()
        await self.pool.warm_up()
        logger.info("inference pool ready processes=%d", settings.pool_processes)

        self.processor = BatchProcessor(
            database=self.database,
            pool=self.pool,
            catalog=self.catalog,
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
        )

        coordinator = ReplayCoordinator(settings, ReplayStore(self.database.pool), self.name)
        self.replay_task = asyncio.create_task(coordinator.run(), name="replay-coordinator")

    async def stop(self) -> None:
        if self.replay_task is not None:
            self.replay_task.cancel()
            await asyncio.gather(self.replay_task, return_exceptions=True)
        if self.pool is not None:
            self.pool.stop()
        if self.database is not None:
            await self.database.close()


class GraphinferApp(faust.App):
    """A Faust app with graphinfer's transport and runtime."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        self.settings = settings
        self.runtime = WorkerRuntime(settings)
        self.online_first = OnlineFirst(replay_share=settings.replay_share)
        self._transport_cls = transport_class(settings.kafka_fetch_max_wait_ms)
        super().__init__(settings.app_id, **options)

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
        await super().on_stop()
        await self.runtime.stop()

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
    app = GraphinferApp(
        settings,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        broker_credentials=credentials,
        # The worker serves no HTTP; Faust's web server would bind port 6066
        # on every interface and collide with a second worker on the host.
        web_enabled=False,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_s / 3.0),
        broker_commit_interval=0.5,
        consumer_auto_offset_reset="earliest",
        topic_allow_declare=False,
        topic_disable_leader=False,
        producer_acks=-1,
        producer_max_request_size=max(1_048_576, settings.max_message_bytes + 65_536),
        stream_buffer_maxsize=max(4096, settings.batch_max_size * 4),
        store="memory://",
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
                async with app.online_first.replay_step():
                    await processor.process(step)
        for event in events:
            await stream.ack(event)


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
