"""One gateway replica: its connections, its reply partition and the request flow.

The gateway never runs models. It validates a request, stores it as
``pending`` with its request hash and tenant, publishes it keyed by its
``request_id`` and, for a synchronous call, waits for the reply on the
partition of the reply topic it leases. HTTP and Kafka callers therefore get
the same replies and the same rows.

The replica starts serving HTTP at once and connects in the background.
Until the database and broker are reachable and a reply partition is
leased, ``/readyz`` reports why and ``/v1`` requests get 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from starlette.types import Receive

from graphinfer import tracing
from graphinfer.api.lease import NoPartitionFree, PartitionLease
from graphinfer.api.metrics import GatewayMetrics
from graphinfer.api.replies import Reply, ReplyRouter
from graphinfer.broker import ensure_topics
from graphinfer.errors import ConfigurationError, ErrorDetail, GraphinferError, RequestRejected
from graphinfer.models.decode import Limits, parse_json, request_hash, validate_document
from graphinfer.models.schema import REQUEST_ID_PATTERN, PredictRequest
from graphinfer.settings import Settings
from graphinfer.storage import requests as stored_requests
from graphinfer.storage.db import Database
from graphinfer.storage.deployments import Deployment, live_deployments
from graphinfer.streams.processor import REPLY_PARTITION_HEADER, TRACEPARENT_HEADER

logger = logging.getLogger(__name__)

_RETRY_MIN_S = 0.5
_RETRY_MAX_S = 2.0
_LEASE_CHECK_INTERVAL_S = 2.0
# How often a waiter whose reply partition this replica no longer reads looks in the database.
_STORED_POLL_S = 0.5
_MODEL_CACHE_S = 2.0
_DATABASE_CHECK_TIMEOUT_S = 2.0
_PRODUCER_START_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 5.0
# The reply reader fetches continuously, so no fetch response for this long means the broker is unreachable.
_BROKER_SILENCE_S = 10.0
_CONNECT_ERRORS = (
    ConfigurationError,
    KafkaError,
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    NoPartitionFree,
)


@dataclass(frozen=True)
class Submission:
    """A request accepted by the gateway: its id, and its stored reply when it is finished already."""

    request_id: str
    reply: Reply | None
    waiter: asyncio.Future[Reply] | None
    # The reply-topic partition named in the request's header, and an event
    # that is set when this replica stops reading that partition.
    partition: int | None = None
    partition_moved: asyncio.Event | None = None


class ClientDisconnected(Exception):
    """The HTTP client closed the connection while its request waited for the reply."""


class Gateway:
    """Connections, reply routing and the request flow of one gateway replica."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limits = Limits(
            max_message_bytes=settings.max_message_bytes,
            max_nodes=settings.max_nodes,
            max_edges=settings.max_edges,
            max_targets=settings.max_targets,
        )
        self.database: Database | None = None
        self.producer: AIOKafkaProducer | None = None
        self.lease = PartitionLease(settings.dsn, settings.reply_topic, settings.database_connect_timeout_s)
        self.router = ReplyRouter(settings, metrics)
        self.problems: dict[str, str] = {
            "database": "not connected yet",
            "broker": "not connected yet",
            "reply_partition": "not leased yet",
        }
        self.in_flight = 0
        self._topics_checked = False
        # Set, and replaced, when this replica starts reading another reply partition.
        self._partition_moved = asyncio.Event()
        self._problem_since: dict[str, float] = {name: time.monotonic() for name in self.problems}
        self._supervisor: asyncio.Task[None] | None = None
        self._deployments: list[Deployment] = []
        self._deployments_read_at = -_MODEL_CACHE_S
        self._deployments_lock = asyncio.Lock()

    # --- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; the replica serves HTTP meanwhile."""
        self._supervisor = asyncio.create_task(self._supervise(), name="graphinfer-gateway-supervisor")
        self._supervisor.add_done_callback(_log_supervisor_end)

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        self.metrics.ready.set(0)
        await self.router.stop()
        await self.lease.release()
        self.metrics.reply_partition.set(-1)
        if self.producer is not None:
            await self.producer.stop()
        if self.database is not None:
            try:
                await asyncio.wait_for(self.database.close(), _CLOSE_TIMEOUT_S)
            except TimeoutError:
                logger.warning(
                    "closing the database pool timed out after %.0f s; terminating it", _CLOSE_TIMEOUT_S
                )
                self.database.pool.terminate()
        logger.info("gateway stopped")

    async def _supervise(self) -> None:
        """Connect, lease a partition, then watch the lease; retry with back-off on every failure."""
        delay = _RETRY_MIN_S
        while True:
            try:
                await self._connect_database()
                await self._connect_broker()
                await self._lease_partition()
            except _CONNECT_ERRORS:
                # Each step records its problem, which /readyz reports.
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            delay = _RETRY_MIN_S
            self.metrics.ready.set(1)
            await self._watch()
            self.metrics.ready.set(0)

    async def _watch(self) -> None:
        """Return when the lease or the reply reader is lost."""
        while True:
            await asyncio.sleep(_LEASE_CHECK_INTERVAL_S)
            failure = self.router.reader_failure()
            if failure is None and not await self.lease.is_held():
                failure = (
                    f"the lease on partition {self.router.partition} was lost with its database "
                    "connection; leasing again"
                )
            if failure is not None:
                self._set_problem("reply_partition", failure)
                await self.lease.release()
                return

    async def _connect_database(self) -> None:
        if self.database is not None:
            return
        try:
            self.database = await Database.connect(
                self.settings.dsn,
                min_size=self.settings.database_pool_min_size,
                max_size=self.settings.database_pool_max_size,
                timeout_s=self.settings.database_connect_timeout_s,
            )
        except ConfigurationError as exc:
            self._set_problem("database", str(exc))
            raise
        self._set_problem("database", None)

    async def _connect_broker(self) -> None:
        try:
            if self.producer is None:
                self.producer = await self._start_producer()
            if not self._topics_checked:
                await ensure_topics(
                    self.settings,
                    {
                        self.settings.request_topic: self.settings.request_partitions,
                        self.settings.reply_topic: self.settings.reply_partitions,
                    },
                )
                self._topics_checked = True
        except ConfigurationError as exc:
            # ensure_topics names the topic and the setting to change.
            self._set_problem("broker", str(exc))
            raise
        except (KafkaError, OSError, TimeoutError) as exc:
            self._set_problem(
                "broker",
                f"no Kafka broker responded at {self.settings.kafka_bootstrap_servers} "
                f"(GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS): {exc!r}",
            )
            raise
        self._set_problem("broker", None)

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            **self.settings.kafka_client_options(),
            client_id=f"{self.settings.app_id}-gateway",
            acks="all",
            max_request_size=self.settings.max_message_bytes + 65_536,
        )
        try:
            await asyncio.wait_for(producer.start(), _PRODUCER_START_TIMEOUT_S)
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def _lease_partition(self) -> None:
        if self.lease.partition is not None and self.router.reader_failure() is None:
            return
        previous = self.router.partition
        try:
            partition = await self.lease.acquire(self.settings.reply_partitions, prefer=previous)
            if partition != previous or self.router.reader_failure() is not None:
                await self.router.start(partition)
            if previous is not None and partition != previous:
                moved, self._partition_moved = self._partition_moved, asyncio.Event()
                moved.set()
        except NoPartitionFree as exc:
            self._set_problem("reply_partition", str(exc))
            raise
        except (KafkaError, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self.lease.release()
            self._set_problem(
                "reply_partition", f"leasing a partition of {self.settings.reply_topic} failed: {exc!r}"
            )
            raise
        self.metrics.reply_partition.set(partition)
        self._set_problem("reply_partition", None)

    def _set_problem(self, name: str, problem: str | None) -> None:
        """Record a component's state; log only changes, so a long outage logs twice."""
        previous = self.problems.get(name)
        now = time.monotonic()
        if problem is None:
            if previous is not None:
                self.problems.pop(name, None)
                logger.info("%s ready after %.1f s", name, now - self._problem_since.get(name, now))
            return
        if previous is None:
            self._problem_since[name] = now
        if problem != previous:
            logger.warning("%s not ready, retrying: %s", name, problem)
        self.problems[name] = problem

    # --- readiness ---------------------------------------------------------------

    async def readiness(self) -> dict[str, str]:
        """Check the database, the broker and the lease now; return the problems by component."""
        problems = dict(self.problems)
        if self.database is not None and "database" not in problems:
            try:
                await self.database.pool.fetchval("SELECT 1", timeout=_DATABASE_CHECK_TIMEOUT_S)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                problems["database"] = f"PostgreSQL (GRAPHINFER_DATABASE_URL) did not answer: {exc!r}"
        broker_problem = self._broker_silence()
        if broker_problem is not None and "broker" not in problems:
            problems["broker"] = broker_problem
        return problems

    def _broker_silence(self) -> str | None:
        if self.router.partition is None:
            return None
        age = self.router.fetch_age_s()
        if age is not None and age <= max(
            _BROKER_SILENCE_S, 3 * self.settings.kafka_fetch_max_wait_ms / 1000
        ):
            return None
        shown = "ever" if age is None else f"{age:.0f} s"
        return f"the broker has not answered a fetch of the reply partition for {shown}"

    def check_ready(self) -> None:
        """Raise ``unavailable`` when a request could not be published and answered now."""
        problems = dict(self.problems)
        broker_problem = self._broker_silence()
        if broker_problem is not None:
            problems["broker"] = broker_problem
        if problems:
            reasons = "; ".join(f"{name}: {problem}" for name, problem in sorted(problems.items()))
            raise GraphinferError(f"the gateway is not ready ({reasons}); retry later", code="unavailable")

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Count a request in flight, or raise ``too_many_requests`` above the limit."""
        limit = self.settings.gateway_max_in_flight
        if self.in_flight >= limit:
            raise GraphinferError(
                f"this gateway replica already handles {self.in_flight} requests "
                f"(GRAPHINFER_GATEWAY_MAX_IN_FLIGHT={limit}); retry after a second",
                code="too_many_requests",
                details=[ErrorDetail("in_flight", self.in_flight, limit)],
            )
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    # --- requests ----------------------------------------------------------------

    def connections(self) -> tuple[Database, AIOKafkaProducer]:
        if self.database is None or self.producer is None:
            self.check_ready()
            raise GraphinferError("the gateway is not connected yet; retry later", code="unavailable")
        return self.database, self.producer

    async def submit(
        self, raw: bytes, tenant: str | None, *, wait: bool, traceparent: str | None
    ) -> Submission:
        """Validate, store as pending and publish a request.

        With ``wait`` the request carries this replica's reply partition, and
        a waiter is registered before it is published. A request id stored
        already with the same request and tenant is not stored again. A
        finished request returns its stored reply. A pending one is published
        again, so a retry after a lost publish still gets a reply. If the
        first copy has finished by the time the worker reads the second, the
        worker re-emits the stored reply. If both are in flight together,
        both are computed and the first stored result stays.
        """
        database, producer = self.connections()

        # 1. Parse and validate, giving the request an id when it has none.
        document = parse_json(raw)
        generated = False
        if isinstance(document, dict) and document.get("request_id") is None:
            document["request_id"] = uuid.uuid4().hex
            generated = True
        try:
            decoded = validate_document(document, self.limits)
            request = decoded.request
            request_id = request.request_id
            assert request_id is not None
            tracing.annotate_current_span({"graphinfer.request_id": request_id, "graphinfer.tenant": tenant})
            await self.check_models(request)
        except GraphinferError as exc:
            # The error body names the caller's own request_id when it has a valid one.
            if not generated and getattr(exc, "request_id", None) is None:
                exc.request_id = _valid_request_id(document)  # type: ignore[attr-defined]
            raise
        digest = request_hash(decoded)

        # 2. Register the waiter, then store the request or compare it with the stored one.
        partition, partition_moved = self.router.partition, self._partition_moved
        waiter = self.router.register(request_id) if wait else None
        try:
            inserted = await stored_requests.insert_pending(
                database,
                request_id=request_id,
                request_hash=digest,
                tenant=tenant,
                task=request.task,
                metadata=dict(request.metadata),
                traceparent=traceparent,
                received_at=datetime.now(UTC),
            )
            if not inserted:
                stored = await self._stored_reply(database, request_id, digest, tenant)
                if stored is not None:
                    if waiter is not None:
                        self.router.discard(request_id, waiter)
                    return Submission(request_id, stored, None)

            # 3. Publish, keyed by the request id.
            body = (
                json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode() if generated else raw
            )
            headers = [("graphinfer-schema", b"1")]
            if wait and partition is not None:
                headers.append((REPLY_PARTITION_HEADER, str(partition).encode()))
            if traceparent:
                headers.append((TRACEPARENT_HEADER, traceparent.encode("ascii", errors="replace")))
            await self._publish(
                database, producer, request_id, digest, body, headers, remove_on_failure=inserted
            )
        except BaseException:
            if waiter is not None:
                self.router.discard(request_id, waiter)
            raise
        return Submission(request_id, None, waiter, partition, partition_moved)

    async def _finished_reply(self, request_id: str) -> Reply | None:
        """Return the stored reply of a finished request, or None while it is pending or unreadable."""
        if self.database is None:
            return None
        try:
            state = await stored_requests.fetch_state(self.database, request_id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.debug("reading a stored reply failed request_id=%s error=%r", request_id, exc)
            return None
        if state is None or state.status == "pending":
            return None
        return state.reply

    async def _stored_reply(
        self, database: Database, request_id: str, digest: str, tenant: str | None
    ) -> Reply | None:
        """Return the stored reply of a finished request with the same id, or None while it is pending."""
        state = await stored_requests.fetch_state(database, request_id)
        if state is None:
            # Removed after a failed publish between the insert and this read.
            raise GraphinferError(
                f"request {request_id!r} changed while it was stored; send it again", code="unavailable"
            )
        if state.request_hash != digest or state.tenant != tenant:
            raise GraphinferError(
                f"request_id {request_id!r} was already used for a different request; send a new request_id",
                code="request_id_conflict",
                details=[ErrorDetail("request_id", request_id, "unused, or the same request")],
            )
        if state.status != "pending":
            return state.reply
        return None

    async def _publish(
        self,
        database: Database,
        producer: AIOKafkaProducer,
        request_id: str,
        digest: str,
        body: bytes,
        headers: list[tuple[str, bytes]],
        *,
        remove_on_failure: bool,
    ) -> None:
        try:
            await producer.send_and_wait(
                self.settings.request_topic, body, key=request_id.encode(), headers=headers
            )
        except KafkaError as exc:
            logger.error("publishing failed request_id=%s error=%r", request_id, exc)
            if remove_on_failure:
                # NOTE: a publish that timed out may still have reached the
                # broker; the worker then stores the request itself, without
                # the tenant.
                await stored_requests.delete_pending(database, request_id, digest)
            raise GraphinferError(
                f"the broker did not accept request {request_id!r}; send it again", code="unavailable"
            ) from None
        self.metrics.published.inc()

    async def wait_for_reply(
        self, submission: Submission, timeout_s: float, receive: Receive
    ) -> Reply | None:
        """Wait for the reply; return None on timeout, raise :class:`ClientDisconnected` on a disconnect."""
        waiter = submission.waiter
        assert waiter is not None
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
        moved = asyncio.ensure_future((submission.partition_moved or asyncio.Event()).wait())
        watched: set[asyncio.Future[Any]] = {waiter, disconnect, moved}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                # After this replica lost its lease and moved to another
                # partition, the reply goes to a partition no replica reads,
                # so the stored result is read from the database instead.
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                wait_s = min(remaining, _STORED_POLL_S) if moved.done() else remaining
                done, _ = await asyncio.wait(watched, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                if moved.done():
                    watched.discard(moved)
                if waiter in done:
                    self.metrics.waits.labels("replied").inc()
                    return waiter.result()
                if disconnect in done:
                    self.metrics.waits.labels("disconnected").inc()
                    logger.debug("client disconnected request_id=%s", submission.request_id)
                    raise ClientDisconnected(submission.request_id)
                if moved.done():
                    stored = await self._finished_reply(submission.request_id)
                    if stored is not None:
                        self.metrics.waits.labels("stored").inc()
                        return stored
            self.metrics.waits.labels("timeout").inc()
            return None
        finally:
            # Runs on cancellation too, so an abandoned waiter never stays registered.
            disconnect.cancel()
            moved.cancel()
            self.router.discard(submission.request_id, waiter)
            waiter.cancel()

    # --- models ------------------------------------------------------------------

    async def deployments(self) -> list[Deployment]:
        """Return the model versions of live workers, read at most every two seconds."""
        database, _ = self.connections()
        async with self._deployments_lock:
            if time.monotonic() - self._deployments_read_at >= _MODEL_CACHE_S:
                self._deployments = await live_deployments(database)
                self._deployments_read_at = time.monotonic()
            return self._deployments

    async def check_models(self, request: PredictRequest) -> None:
        """Reject a request that names a model no live worker serves.

        With no live worker at all the request is accepted: it waits in the
        request topic until a worker runs, which then decides.
        """
        if not request.models:
            return
        deployments = await self.deployments()
        if not deployments:
            return
        versions = {(deployment.model, deployment.version) for deployment in deployments}
        names = {deployment.model for deployment in deployments}
        available = sorted(f"{model}@{version}" for model, version in versions)
        for index, ref in enumerate(request.models):
            name, _, version = ref.partition("@")
            known = (name, int(version)) in versions if version else name in names
            if not known:
                raise RequestRejected(
                    f"model {ref!r} is not served by any live worker; name one of "
                    f"{', '.join(available)} (GET /v1/models lists them)",
                    code="unknown_model",
                    details=[ErrorDetail(f"models[{index}]", ref, available)],
                )


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body is read already, so the server's next message is the disconnect.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _log_supervisor_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "the gateway stopped connecting and stays not ready; restart it", exc_info=task.exception()
        )


def _valid_request_id(document: Any) -> str | None:
    """Return the document's request_id when it is a well-formed one, else None."""
    value = document.get("request_id") if isinstance(document, dict) else None
    return value if isinstance(value, str) and re.fullmatch(REQUEST_ID_PATTERN, value) else None
