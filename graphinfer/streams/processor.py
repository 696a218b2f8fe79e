"""The worker's batch step: decode, select, infer, store, reply.

:class:`BatchProcessor` does not depend on Faust. It takes a batch of raw
Kafka messages and returns once every message's outcome is stored in
PostgreSQL and its replies are delivered; only then may the caller
acknowledge the batch, so its offsets are committed only after that.

A batch that raises an unexpected exception runs once more, then one
message at a time. A message that still raises is answered ``failed`` with
code ``internal`` and dead-lettered, so one message that breaks the
worker's code does not stop the stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from graphinfer import metrics, tracing
from graphinfer.errors import ErrorDetail, GraphinferError, RequestRejected
from graphinfer.models.decode import DecodedRequest, Limits, decode_request, request_hash
from graphinfer.models.engine import Selection, select_models
from graphinfer.models.pool import InferencePool, Job
from graphinfer.models.repository import ModelCatalog
from graphinfer.models.schema import REQUEST_ID_PATTERN
from graphinfer.storage.db import Database, DeadLetter, RequestRecord, StoredRequest
from graphinfer.streams.retry import FlowControl, Retrier

logger = logging.getLogger(__name__)

_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)
REPLY_PARTITION_HEADER = "graphinfer-reply-partition"
REPLAY_RUN_HEADER = "graphinfer-replay-run"
TRACEPARENT_HEADER = "traceparent"
DLQ_HEADERS = (
    "graphinfer-dlq-code",
    "graphinfer-dlq-reason",
    "graphinfer-dlq-topic",
    "graphinfer-dlq-partition",
    "graphinfer-dlq-offset",
)
TERMINAL = frozenset({"ok", "partial", "failed", "rejected", "expired"})

# send(topic, key, value, partition, headers) schedules one message and
# returns an awaitable that resolves once the broker has it.
Send = Callable[
    [str, bytes | None, bytes | None, int | None, list[tuple[str, bytes]]], Awaitable[Awaitable[Any]]
]


@dataclass(frozen=True)
class Message:
    """A raw Kafka message as the worker received it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ServedModels:
    """The model versions a worker serves and the pool that has them loaded."""

    catalog: ModelCatalog
    pool: InferencePool


@dataclass(frozen=True)
class Topics:
    requests: str
    replay: str
    predictions: str
    replies: str
    dead_letters: str


@dataclass
class _Item:
    """One message on its way through the batch."""

    message: Message
    received_at: datetime
    decoded: DecodedRequest | None = None
    request_id: str | None = None
    request_hash: str | None = None
    rejection: GraphinferError | None = None
    stored_reply: dict[str, Any] | None = None
    # An earlier message of the same batch with the same request_id and request.
    duplicate_of: _Item | None = None
    selection: Selection | None = None
    expired: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)
    reply: dict[str, Any] | None = None


class InjectedFault(RuntimeError):
    """The failure that ``GRAPHINFER_FAULT_INJECTION_RAISE_AFTER_MESSAGES`` raises once, for tests."""


class BatchProcessor:
    """Turns a batch of request messages into stored results and replies."""

    def __init__(
        self,
        *,
        database: Database,
        models: ServedModels,
        send: Send,
        topics: Topics,
        limits: Limits,
        default_models: Sequence[str] = (),
        retry_max_delay_s: float = 30.0,
        flow: FlowControl | None = None,
        raise_after_messages: int = 0,
    ) -> None:
        self.database = database
        # Replaced as a whole on a model reload; a batch keeps the one it started with.
        self.models = models
        self.send = send
        self.topics = topics
        self.limits = limits
        self.default_models = tuple(default_models)
        self.retrier = Retrier(max_delay_s=retry_max_delay_s, flow=flow)
        # Off unless a test sets GRAPHINFER_FAULT_INJECTION_RAISE_AFTER_MESSAGES.
        self.raise_after_messages = raise_after_messages
        self._messages_seen = 0
        # (topic, partition) to the highest offset whose outcome is stored and delivered.
        self.finished: dict[tuple[str, int], int] = {}

    async def process(self, messages: Sequence[Message]) -> None:
        """Handle one batch; return only when its outcomes are stored and its replies delivered.

        Database and broker failures are retried until they succeed. Any
        other exception makes the batch run once more, and when that fails
        too, one message at a time.
        """
        try:
            await self._process(messages)
            return
        except Exception:
            metrics.BATCH_ERRORS.inc()
            logger.exception(
                "batch failed with an unexpected error; running it once more %s", _describe_offsets(messages)
            )
        # A failure that does not repeat costs one more run of the batch.
        try:
            await self._process(messages)
            return
        except Exception:
            logger.exception(
                "batch failed again; processing its %d messages one at a time %s",
                len(messages),
                _describe_offsets(messages),
            )
        for message in messages:
            try:
                await self._process([message])
            except Exception as exc:
                logger.exception(
                    "message failed with an unexpected error; replying with status failed and dead-lettering it "
                    "topic=%s partition=%d offset=%d",
                    message.topic,
                    message.partition,
                    message.offset,
                )
                await self._fail_internal(message, exc)

    async def _process(self, messages: Sequence[Message]) -> None:
        now = datetime.now(UTC)
        models = self.models
        items = [_Item(message=message, received_at=now) for message in messages]

        # 1. Decode and validate every message.
        for item in items:
            self._decode(item)

        # 2. Compare with what is stored: a finished request re-emits its
        #    stored reply, and a reused id with another request is a conflict.
        await self._check_stored(items)
        self._merge_duplicates(items)

        # 3. Select models, expire late requests.
        for item in items:
            if (
                item.decoded is not None
                and item.rejection is None
                and item.stored_reply is None
                and item.duplicate_of is None
            ):
                self._select(item, models.catalog)

        # 4. Run the models off the event loop.
        await self._infer(items, models.pool)
        self._maybe_inject_fault(len(items))

        # 5. Build the replies, then store everything in one transaction.
        for item in items:
            if item.duplicate_of is not None:
                item.reply = item.duplicate_of.reply
            else:
                item.reply = item.stored_reply or self._build_reply(item)
        await self._retry("store", lambda: self._write(items))

        # 6. Deliver replies and dead letters.
        await self._retry("produce", lambda: self._deliver(items))
        self._finish(items)

    async def _fail_internal(self, message: Message, exc: Exception) -> None:
        """Store and send a ``failed`` reply with code ``internal`` and dead-letter the message."""
        item = _Item(message=message, received_at=datetime.now(UTC))
        try:
            self._decode(item)
        except Exception:
            logger.exception(
                "decoding failed as well partition=%d offset=%d", message.partition, message.offset
            )
        # The request's own content may be what broke the worker, so none of
        # it (metadata included) goes into the stored reply.
        item.decoded = None
        item.rejection = GraphinferError(
            f"the worker failed on this message with an unexpected error ({type(exc).__name__}); "
            "it was dead-lettered for an operator to inspect, and sending it again is unlikely to help",
            code="internal",
        )
        item.reply = self._build_reply(item)
        await self._retry("store", lambda: self._write([item]))
        await self._retry("produce", lambda: self._deliver([item]))
        self._finish([item])

    async def _write(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        await self.database.write_batch(*self._records(items))
        metrics.DATABASE_WRITE.observe(time.perf_counter() - started)

    def _finish(self, items: Sequence[_Item]) -> None:
        delivered = datetime.now(UTC)
        metrics.BATCH_SIZE.observe(len(items))
        for item in items:
            message = item.message
            key = (message.topic, message.partition)
            self.finished[key] = max(self.finished.get(key, -1), message.offset)
            metrics.END_TO_END.observe((delivered - item.received_at).total_seconds())
            if item.stored_reply is None and item.duplicate_of is None:
                for result in (item.reply or {}).get("results", []):
                    outcome = (
                        "ok" if result["status"] == "ok" else (result.get("error") or {}).get("code", "error")
                    )
                    model, version = result["model"], str(result.get("version", ""))
                    metrics.MODEL_RESULTS.labels(model, version, outcome).inc()
                    if result.get("latency_ms") is not None:
                        metrics.MODEL_LATENCY.labels(model, version).observe(result["latency_ms"] / 1000.0)
        self._count(items)
        tracing.record_finished(items, delivered)

    def _count(self, items: Sequence[_Item]) -> None:
        for item in items:
            source, _ = self._source(item.message)
            if item.reply is not None:
                metrics.MESSAGES.labels(source, item.reply["status"]).inc()
                error = item.reply.get("error")
                if error is not None and item.stored_reply is None:
                    metrics.REJECTIONS.labels(source, error.get("code", "unknown")).inc()
            if item.rejection is not None:
                metrics.DEAD_LETTERS.labels(item.rejection.code).inc()

    def _maybe_inject_fault(self, count: int) -> None:
        if self.raise_after_messages <= 0:
            return
        self._messages_seen += count
        if self._messages_seen >= self.raise_after_messages:
            self.raise_after_messages = 0
            raise InjectedFault(
                f"injected fault after {self._messages_seen} messages "
                "(GRAPHINFER_FAULT_INJECTION_RAISE_AFTER_MESSAGES)"
            )

    # --- steps ---------------------------------------------------------------

    def _decode(self, item: _Item) -> None:
        message = item.message
        try:
            item.decoded = decode_request(
                message.value, self.limits, key=message.key, headers=message.headers
            )
        except RequestRejected as exc:
            item.rejection = exc
            # The Kafka key carries the request_id by contract, so a message whose
            # body cannot give one (not JSON, too large) is still answered under it.
            item.request_id = getattr(exc, "request_id", None) or _key_as_request_id(message.key)
            item.request_hash = hashlib.sha256(message.value or b"").hexdigest()
            logger.debug(
                "request rejected request_id=%s code=%s partition=%d offset=%d",
                item.request_id,
                exc.code,
                message.partition,
                message.offset,
            )
            return
        item.request_id = item.decoded.request.request_id
        item.request_hash = request_hash(item.decoded)

    async def _check_stored(self, items: list[_Item]) -> None:
        ids = [item.request_id for item in items if item.request_id is not None]
        if not ids:
            return
        stored: dict[str, StoredRequest] = await self._retry(
            "read", lambda: self.database.fetch_requests(ids)
        )
        for item in items:
            previous = stored.get(item.request_id or "")
            if previous is None:
                continue
            if previous.status == "rejected":
                # A rejected request does not use up its id: a corrected request,
                # or the owner's after a message under a wrong key, is processed.
                continue
            if previous.request_hash != item.request_hash:
                if item.rejection is None:
                    item.rejection = GraphinferError(
                        f"request_id {item.request_id!r} was already used for a different request "
                        "(its graph, task, models or targets differ); send a new request_id",
                        code="request_id_conflict",
                        details=[ErrorDetail("request_id", item.request_id, "unused, or the same request")],
                    )
                    item.decoded = None
            elif previous.status in TERMINAL and previous.reply is not None:
                item.stored_reply = previous.reply

    def _merge_duplicates(self, items: list[_Item]) -> None:
        """Reply once to a request_id repeated in one batch, and reject a repeat with another request as a conflict."""
        first: dict[str, _Item] = {}
        for item in items:
            if item.request_id is None or item.rejection is not None or item.stored_reply is not None:
                continue
            earlier = first.get(item.request_id)
            if earlier is None:
                first[item.request_id] = item
            elif earlier.request_hash == item.request_hash:
                item.duplicate_of = earlier
            else:
                item.rejection = GraphinferError(
                    f"request_id {item.request_id!r} was already used for a different request "
                    "(its graph, task, models or targets differ); send a new request_id",
                    code="request_id_conflict",
                    details=[ErrorDetail("request_id", item.request_id, "unused, or the same request")],
                )
                item.decoded = None

    def _select(self, item: _Item, catalog: ModelCatalog) -> None:
        assert item.decoded is not None
        request = item.decoded.request
        if request.deadline is not None and request.deadline <= item.received_at:
            item.expired = True
            return
        try:
            item.selection = select_models(request, item.decoded.graph, catalog, self.default_models)
        except GraphinferError as exc:
            item.rejection = exc

    async def _infer(self, items: list[_Item], pool: InferencePool) -> None:
        runnable = [item for item in items if item.selection is not None and item.selection.run]
        jobs = [
            Job(raw=item.message.value or b"", model_refs=tuple(entry.ref for entry in item.selection.run))
            for item in runnable
            if item.selection is not None
        ]
        # A batch from the replay topic runs in the background, leaving a pool process free for online batches.
        background = bool(items) and all(item.message.topic == self.topics.replay for item in items)
        answers = await pool.run(jobs, background=background)
        for item, results in zip(runnable, answers, strict=True):
            item.results = results

    def _build_reply(self, item: _Item) -> dict[str, Any]:
        completed_at = datetime.now(UTC)
        source, run_id = self._source(item.message)
        metadata = dict(item.decoded.request.metadata) if item.decoded is not None else {}
        reply: dict[str, Any] = {
            "request_id": item.request_id,
            "status": "ok",
            "source": source,
            "replay_run_id": run_id,
            "metadata": metadata,
            "results": [],
            "skipped": [],
            "error": None,
            "received_at": item.received_at.isoformat(),
            "completed_at": completed_at.isoformat(),
        }
        if item.rejection is not None:
            # An internal error is the worker's failure, not the request's.
            reply["status"] = "failed" if item.rejection.code == "internal" else "rejected"
            reply["error"] = item.rejection.to_dict()
            reply["skipped"] = list(getattr(item.rejection, "skipped", []))
        elif item.expired:
            assert item.decoded is not None and item.decoded.request.deadline is not None
            deadline = item.decoded.request.deadline.isoformat()
            reply["status"] = "expired"
            reply["error"] = {
                "code": "expired",
                "message": f"the deadline {deadline} passed before work started; send it again with a later deadline",
                "details": [{"field": "deadline", "value": deadline, "limit": item.received_at.isoformat()}],
            }
        else:
            assert item.selection is not None
            results = item.selection.errors + item.results
            reply["results"] = results
            reply["skipped"] = item.selection.skipped
            reply["status"] = _status(results)
        return reply

    def _records(self, items: list[_Item]) -> tuple[list[RequestRecord], list[DeadLetter]]:
        records: list[RequestRecord] = []
        dead_letters: list[DeadLetter] = []
        for item in items:
            message, reply = item.message, item.reply
            assert reply is not None
            if item.rejection is not None:
                dead_letters.append(
                    DeadLetter(
                        topic=message.topic,
                        partition=message.partition,
                        offset=message.offset,
                        request_id=item.request_id,
                        key=message.key,
                        value=message.value,
                        code=item.rejection.code,
                        reason=item.rejection.message,
                    )
                )
            if item.request_id is None or item.stored_reply is not None or item.duplicate_of is not None:
                continue
            if item.rejection is not None and item.rejection.code == "request_id_conflict":
                continue
            source, run_id = self._source(message)
            request = item.decoded.request if item.decoded is not None else None
            records.append(
                RequestRecord(
                    request_id=item.request_id,
                    request_hash=item.request_hash or "",
                    status=reply["status"],
                    source=source,
                    replay_run_id=run_id,
                    task=request.task if request is not None else None,
                    metadata=dict(request.metadata) if request is not None else {},
                    reply=reply,
                    error_code=(reply.get("error") or {}).get("code"),
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    traceparent=_traceparent(message),
                    received_at=item.received_at,
                    completed_at=datetime.fromisoformat(reply["completed_at"]),
                    results=reply["results"],
                )
            )
        return records, dead_letters

    async def _deliver(self, items: list[_Item]) -> None:
        pending: list[Awaitable[Any]] = []
        for item in items:
            message, reply = item.message, item.reply
            assert reply is not None
            reply_headers = _forwarded_headers(message)
            if item.request_id is not None:
                value = json.dumps(reply, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
                key = item.request_id.encode()
                pending.append(await self.send(self.topics.predictions, key, value, None, reply_headers))
                reply_partition = _reply_partition(message)
                if reply_partition is not None:
                    pending.append(
                        await self.send(self.topics.replies, key, value, reply_partition, reply_headers)
                    )
            if item.rejection is not None:
                headers = _dead_letter_headers(message, item.rejection)
                original = message.value
                # The producer refuses records over its request size (the
                # message limit plus 64 KiB, at least 1 MiB), so the dead-letter
                # copy of a larger message keeps its first bytes and records the
                # original size in a header. 16 KiB are left for key and headers.
                room = max(1_048_576, self.limits.max_message_bytes + 65_536) - 16_384
                if original is not None and len(original) > room:
                    headers.append(("graphinfer-dlq-truncated", str(len(original)).encode()))
                    original = original[:room]
                pending.append(
                    await self.send(self.topics.dead_letters, message.key, original, None, headers)
                )
        await asyncio.gather(*pending)

    def _source(self, message: Message) -> tuple[str, str | None]:
        if message.topic == self.topics.replay:
            return "replay", _header_text(message, REPLAY_RUN_HEADER)
        return "online", None

    async def _retry(self, what: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """Run an operation until it succeeds, backing off up to ``retry_max_delay_s``."""
        return await self.retrier.run(what, operation)


def _key_as_request_id(key: bytes | None) -> str | None:
    if key is None:
        return None
    text = key.decode("utf-8", errors="replace")
    return text if _REQUEST_ID_RE.fullmatch(text) else None


def _status(results: list[dict[str, Any]]) -> str:
    failed = sum(1 for result in results if result["status"] != "ok")
    if failed == 0:
        return "ok"
    return "failed" if failed == len(results) else "partial"


def _header_text(message: Message, name: str) -> str | None:
    raw = message.headers.get(name)
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _traceparent(message: Message) -> str | None:
    """Return the W3C traceparent header when well formed; anything else is not stored."""
    context = tracing.parse_traceparent(_header_text(message, TRACEPARENT_HEADER))
    return None if context is None else tracing.format_traceparent(context)


def _describe_offsets(messages: Sequence[Message]) -> str:
    ranges: dict[tuple[str, int], list[int]] = {}
    for message in messages:
        ranges.setdefault((message.topic, message.partition), []).append(message.offset)
    return " ".join(
        f"{topic}/{partition}={min(offsets)}-{max(offsets)}"
        for (topic, partition), offsets in sorted(ranges.items())
    )


def _reply_partition(message: Message) -> int | None:
    text = _header_text(message, REPLY_PARTITION_HEADER)
    if text is None or not text.strip().isdigit():
        return None
    return int(text.strip())


def _forwarded_headers(message: Message) -> list[tuple[str, bytes]]:
    headers = [("graphinfer-schema", b"1")]
    traceparent = message.headers.get(TRACEPARENT_HEADER)
    if traceparent is not None:
        headers.append((TRACEPARENT_HEADER, traceparent))
    return headers


def _dead_letter_headers(message: Message, error: GraphinferError) -> list[tuple[str, bytes]]:
    values = (error.code, error.message, message.topic, str(message.partition), str(message.offset))
    own = [(name, value.encode("utf-8")) for name, value in zip(DLQ_HEADERS, values, strict=True)]
    original = [(name, value) for name, value in message.headers.items() if name not in DLQ_HEADERS]
    return own + original
