"""The worker's batch step: decode, select, infer, store, reply.

:class:`BatchProcessor` knows nothing of Faust. It takes a batch of raw
Kafka messages and returns once every message's outcome is stored in
PostgreSQL and its replies are delivered; only then may the caller
acknowledge the batch, so its offsets are committed only after that.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError

from graphinfer.errors import ErrorDetail, GraphinferError, RequestRejected
from graphinfer.models.decode import DecodedRequest, Limits, decode_request, request_hash
from graphinfer.models.engine import Selection, select_models
from graphinfer.models.pool import InferencePool, Job
from graphinfer.models.repository import ModelCatalog
from graphinfer.storage.db import Database, DeadLetter, RequestRecord, StoredRequest

logger = logging.getLogger(__name__)

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
    selection: Selection | None = None
    expired: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)
    reply: dict[str, Any] | None = None


class BatchProcessor:
    """Turns a batch of request messages into stored results and replies."""

    def __init__(
        self,
        *,
        database: Database,
        pool: InferencePool,
        catalog: ModelCatalog,
        send: Send,
        topics: Topics,
        limits: Limits,
        default_models: Sequence[str] = (),
        retry_max_delay_s: float = 30.0,
    ) -> None:
        self.database = database
        self.pool = pool
        self.catalog = catalog
        self.send = send
        self.topics = topics
        self.limits = limits
        self.default_models = tuple(default_models)
        self.retry_max_delay_s = retry_max_delay_s

    async def process(self, messages: Sequence[Message]) -> None:
        """Handle one batch; return only when its outcomes are stored and its replies delivered."""
        now = datetime.now(UTC)
        items = [_Item(message=message, received_at=now) for message in messages]

        # 1. Decode and validate every message.
        for item in items:
            self._decode(item)

        # 2. Compare with what is stored: a finished request re-emits its
        #    stored reply, and a reused id with another request is a conflict.
        await self._check_stored(items)

        # 3. Select models, expire late requests.
        for item in items:
            if item.decoded is not None and item.rejection is None and item.stored_reply is None:
                self._select(item)

        # 4. Run the models off the event loop.
        await self._infer(items)

        # 5. Build the replies, then store everything in one transaction.
        for item in items:
            item.reply = item.stored_reply or self._build_reply(item)
        await self._retry("store", lambda: self.database.write_batch(*self._records(items)))

        # 6. Deliver replies and dead letters.
        await self._retry("produce", lambda: self._deliver(items))

    # --- steps ---------------------------------------------------------------

    def _decode(self, item: _Item) -> None:
        message = item.message
        try:
            item.decoded = decode_request(
                message.value, self.limits, key=message.key, headers=message.headers
            )
        except RequestRejected as exc:
            item.rejection = exc
            item.request_id = getattr(exc, "request_id", None)
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

    def _select(self, item: _Item) -> None:
        assert item.decoded is not None
        request = item.decoded.request
        if request.deadline is not None and request.deadline <= item.received_at:
            item.expired = True
            return
        try:
            item.selection = select_models(request, item.decoded.graph, self.catalog, self.default_models)
        except GraphinferError as exc:
            item.rejection = exc

    async def _infer(self, items: list[_Item]) -> None:
        runnable = [item for item in items if item.selection is not None and item.selection.run]
        jobs = [
            Job(raw=item.message.value or b"", model_refs=tuple(entry.ref for entry in item.selection.run))
            for item in runnable
            if item.selection is not None
        ]
        # A batch from the replay topic runs in the background, leaving a pool process free for online batches.
        background = bool(items) and all(item.message.topic == self.topics.replay for item in items)
        answers = await self.pool.run(jobs, background=background)
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
            reply["status"] = "rejected"
            reply["error"] = item.rejection.to_dict()
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
            if item.request_id is None or item.stored_reply is not None:
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
                    traceparent=_header_text(message, TRACEPARENT_HEADER),
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
                pending.append(
                    await self.send(
                        self.topics.dead_letters,
                        message.key,
                        message.value,
                        None,
                        _dead_letter_headers(message, item.rejection),
                    )
                )
        await asyncio.gather(*pending)

    def _source(self, message: Message) -> tuple[str, str | None]:
        if message.topic == self.topics.replay:
            return "replay", _header_text(message, REPLAY_RUN_HEADER)
        return "online", None

    async def _retry(self, what: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """Run an operation until it succeeds, backing off up to ``retry_max_delay_s``."""
        delay = 0.5
        failures = 0
        while True:
            try:
                result = await operation()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, KafkaError, TimeoutError) as exc:
                failures += 1
                logger.warning(
                    "%s failed, retrying in %.1f s attempt=%d error=%r", what, delay, failures, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_delay_s)
                continue
            if failures:
                logger.info("%s succeeded again after %d failed attempts", what, failures)
            return result


def _status(results: list[dict[str, Any]]) -> str:
    failed = sum(1 for result in results if result["status"] != "ok")
    if failed == 0:
        return "ok"
    return "failed" if failed == len(results) else "partial"


def _header_text(message: Message, name: str) -> str | None:
    raw = message.headers.get(name)
    return None if raw is None else raw.decode("utf-8", errors="replace")


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
