"""Reply routing: read the leased reply partition and hand each reply to its waiter.

A replica publishes its requests with the number of the partition it leases
in the ``graphinfer-reply-partition`` header, and the worker produces the
reply to that partition of the reply topic as well as to ``predictions``.
The replica reads only that partition, assigned rather than subscribed, so
it never reads another replica's replies. A waiter is registered before its
request is published, so even an instant reply finds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from graphinfer.api.metrics import GatewayMetrics
from graphinfer.errors import GraphinferError
from graphinfer.settings import Settings

logger = logging.getLogger(__name__)

Reply = dict[str, Any]

# Request ids this replica published, newest last. A reply for an id that has
# dropped out is counted as foreign.
# NOTE: 100,000 ids cover more than 30 s at 3,000 requests/s; a reply later
# than that is miscounted as foreign but still ignored.
_PUBLISHED_MEMORY = 100_000
_POSITION_TIMEOUT_S = 30.0
_FETCH_TIMEOUT_MS = 500
_RETRY_DELAY_S = 1.0


class ReplyRouter:
    """Reads one partition of the reply topic and resolves the futures waiting for its replies."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.topic = settings.reply_topic
        self.metrics = metrics
        self.max_waiters = settings.gateway_max_in_flight
        self.partition: int | None = None
        self.start_offset: int | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[asyncio.Future[Reply]]] = {}
        self._waiter_count = 0
        # request_id -> whether a reply for it was already matched
        self._published: OrderedDict[str, bool] = OrderedDict()

    # --- partition -------------------------------------------------------------

    async def start(self, partition: int) -> None:
        """Read ``partition`` from its current end; replies already in it are skipped."""
        await self._stop_reader()
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                **self.settings.kafka_client_options(),
                client_id=f"{self.settings.app_id}-gateway-replies",
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms,
                max_partition_fetch_bytes=max(1_048_576, self.settings.max_message_bytes + 65_536),
            )
            try:
                await consumer.start()
            except BaseException:
                await consumer.stop()
                raise
            self._consumer = consumer
        tp = TopicPartition(self.topic, partition)
        self._consumer.assign([tp])
        self.start_offset = await self._seek_to_true_end(self._consumer, tp)
        self.partition = partition
        logger.info(
            "reading replies topic=%s partition=%d offset=%d", self.topic, partition, self.start_offset
        )
        self._reader = asyncio.create_task(self._read(self._consumer), name="graphinfer-reply-reader")

    async def _seek_to_true_end(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
        # Tansu's end_offsets() (and so seek_to_end) returns the last batch's
        # first offset + 1, which can lie below the true end but never above
        # it. Start there, then move to the high watermark that the first
        # fetch response reports, which is right on Tansu and Apache Kafka.
        await consumer.seek_to_end(tp)
        deadline = time.monotonic() + _POSITION_TIMEOUT_S
        while consumer.highwater(tp) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no fetch response for {tp.topic} partition {tp.partition} within "
                    f"{_POSITION_TIMEOUT_S:.0f} s"
                )
            await consumer.getmany(tp, timeout_ms=100)
        end = consumer.highwater(tp)
        assert end is not None
        if await consumer.position(tp) < end:
            consumer.seek(tp, end)
        return int(end)

    def reader_failure(self) -> str | None:
        """Describe why the reader task ended, or return None while it runs."""
        reader = self._reader
        if reader is None or not reader.done():
            return None
        if reader.cancelled():
            return "the reply reader was cancelled"
        return f"the reply reader stopped: {reader.exception()!r}"

    def fetch_age_s(self) -> float | None:
        """Return the seconds since the last fetch response for the partition, or None before the first."""
        if self._consumer is None or self.partition is None:
            return None
        tp = TopicPartition(self.topic, self.partition)
        if not self._consumer.assignment() or tp not in self._consumer.assignment():
            return None
        timestamp_ms = self._consumer.last_poll_timestamp(tp)
        if timestamp_ms is None:
            return None
        return max(0.0, time.time() - timestamp_ms / 1000.0)

    async def stop(self) -> None:
        """Stop reading and fail every waiter, so no request waits for a reply that cannot arrive."""
        await self._stop_reader()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        self.partition = None
        for request_id in list(self._waiters):
            for future in self._waiters.pop(request_id):
                if not future.done():
                    future.set_exception(
                        GraphinferError(
                            "the gateway is shutting down; the request is kept, so poll "
                            f"GET /v1/requests/{request_id}",
                            code="unavailable",
                        )
                    )
        self._waiter_count = 0
        self.metrics.pending_replies.set(0)

    async def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    # --- waiters ---------------------------------------------------------------

    @property
    def waiter_count(self) -> int:
        return self._waiter_count

    def register(self, request_id: str) -> asyncio.Future[Reply]:
        """Create a future that the reply for ``request_id`` resolves; call before publishing."""
        if self._waiter_count >= self.max_waiters:
            raise GraphinferError(
                f"{self._waiter_count} requests already wait for replies on this gateway "
                f"(GRAPHINFER_GATEWAY_MAX_IN_FLIGHT={self.max_waiters}); retry later",
                code="too_many_requests",
            )
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(future)
        self._waiter_count += 1
        self.metrics.pending_replies.set(self._waiter_count)
        self._published[request_id] = False
        self._published.move_to_end(request_id)
        while len(self._published) > _PUBLISHED_MEMORY:
            self._published.popitem(last=False)
        return future

    def discard(self, request_id: str, future: asyncio.Future[Reply]) -> None:
        """Remove one waiter; a reply that arrives later is counted as late and dropped."""
        futures = self._waiters.get(request_id)
        if futures is None or future not in futures:
            return
        futures.remove(future)
        if not futures:
            del self._waiters[request_id]
        self._waiter_count -= 1
        self.metrics.pending_replies.set(self._waiter_count)

    # --- reading -----------------------------------------------------------------

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        failures = 0
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=_FETCH_TIMEOUT_MS, max_records=1_000)
            except KafkaError as exc:
                failures += 1
                if failures == 1:
                    logger.warning(
                        "reading replies failed, retrying partition=%s error=%r", self.partition, exc
                    )
                await asyncio.sleep(_RETRY_DELAY_S)
                continue
            if failures:
                logger.info("reading replies again after %d failed attempts", failures)
                failures = 0
            for records in batches.values():
                for record in records:
                    if self.start_offset is not None and record.offset < self.start_offset:
                        continue
                    self._route(record.key, record.value)

    def _route(self, key: bytes | None, value: bytes | None) -> None:
        request_id = key.decode("utf-8", errors="replace") if key is not None else ""
        futures = self._waiters.pop(request_id, None)
        if futures:
            # Only replies with a waiter are decoded.
            self._resolve(request_id, futures, value)
            self._published[request_id] = True
            self.metrics.replies.labels("matched").inc()
            return
        matched = self._published.get(request_id)
        if matched is None:
            self.metrics.replies.labels("foreign").inc()
            logger.debug("reply for a request this replica did not publish request_id=%s", request_id)
        elif matched:
            self.metrics.replies.labels("duplicate").inc()
        else:
            self._published[request_id] = True
            self.metrics.replies.labels("late").inc()

    def _resolve(self, request_id: str, futures: list[asyncio.Future[Reply]], value: bytes | None) -> None:
        self._waiter_count -= len(futures)
        self.metrics.pending_replies.set(self._waiter_count)
        try:
            reply = json.loads(value or b"")
        except ValueError as exc:
            logger.error("undecodable reply request_id=%s error=%r", request_id, exc)
            error = GraphinferError(
                f"the reply to {request_id!r} is not valid JSON; poll GET /v1/requests/{request_id}",
                code="internal",
            )
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        for future in futures:
            if not future.done():
                future.set_result(reply)
