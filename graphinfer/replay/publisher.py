"""Publishing one replay run: every record of the data set, a bounded window at a time.

The publisher owns the run while it heartbeats. It sends each readable
record as a v1 request to the replay topic, with the run id in a header.
At most ``window`` records are outstanding, that is published but not yet
stored by the worker. The publisher keeps the ids it sent and, while the
window is full, asks PostgreSQL which of them are stored, so each check
costs at most ``window`` primary-key lookups however long the run is. The
run is finished when every published record is stored.

A resumed run (its earlier publisher died or was stopped) first waits for
the records that publisher sent to stop arriving, then sends only the
records not stored yet, so nothing is scored or stored twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from aiokafka.errors import KafkaError

from graphinfer import metrics
from graphinfer.replay.ids import make_run_id
from graphinfer.replay.sources import DatasetError, DatasetReader, DatasetSpec, Record, make_request
from graphinfer.storage.replay import NewRun, RecordError, ReplayRun, ReplayStore
from graphinfer.streams.processor import REPLAY_RUN_HEADER

logger = logging.getLogger(__name__)

T = TypeVar("T")

# send(topic, key, value, headers) schedules one message and returns an
# awaitable that resolves once the broker has it (aiokafka's producer.send).
Send = Callable[[str, bytes, bytes, list[tuple[str, bytes]]], Awaitable[Awaitable[Any]]]

_TRANSIENT_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, KafkaError, TimeoutError)


class RunLostError(Exception):
    """Another process took the run over, because this one's heartbeat went stale."""


@dataclass(frozen=True)
class PublishOptions:
    topic: str
    window: int
    stale_s: float
    max_message_bytes: int
    read_batch_size: int = 200
    poll_s: float = 0.1

    @property
    def heartbeat_s(self) -> float:
        return max(0.2, self.stale_s / 4)

    @property
    def drain_quiet_s(self) -> float:
        """How long a resumed run waits without new stored requests before it sends again."""
        return max(1.0, self.stale_s)


class RunPublisher:
    """The publisher of one run that ``owner`` has claimed."""

    def __init__(
        self,
        store: ReplayStore,
        send: Send,
        options: PublishOptions,
        owner: str,
        database_url: str | None = None,
    ) -> None:
        self.store = store
        self.send = send
        self.options = options
        self.owner = owner
        self.database_url = database_url
        self.run_id = ""
        self.published = 0
        self.all_published = False
        # Request ids sent and not yet seen stored, oldest first (a dict keeps insertion order).
        self.outstanding: dict[str, None] = {}

    async def execute(self, run: ReplayRun, *, wait: bool = True) -> ReplayRun:
        """Publish ``run`` and, with ``wait``, stay until it is finished; return its latest row.

        Without ``wait`` the run is released once every record is published,
        and the replay leader marks it finished when the last results are
        stored. Raises :class:`RunLostError` when another process took the
        run over.

        A data set that cannot be read marks the run failed. A data set whose
        content changed since the run was created makes a new run that
        supersedes this one.
        """
        self.run_id = run.run_id
        started = time.monotonic()

        # 1. Check the data set against the run's content hash.
        reader = DatasetReader(DatasetSpec.parse(run.dataset), self.database_url)
        try:
            summary = await reader.summary()
        except DatasetError as exc:
            logger.error("replay run failed run_id=%s error=%s", run.run_id, exc)
            metrics.REPLAY_RUNS.labels("failed").inc()
            await self.store.fail(run.run_id, self.owner, str(exc))
            return await self._row(run.run_id)
        if summary.content_hash != run.dataset_hash:
            run = await self._supersede(run, summary.content_hash, summary.total)
        await self.store.set_total(run.run_id, self.owner, summary.total)
        metrics.REPLAY_RECORDS.labels("total").set(summary.total)
        self._report()

        # 2. Publish under a heartbeat, then wait for the last results.
        logger.info(
            "replay run started run_id=%s dataset=%s records=%d attempt=%d window=%d",
            run.run_id,
            reader.spec,
            summary.total,
            run.attempts,
            self.options.window,
        )
        heartbeat = asyncio.create_task(self._heartbeat(run.run_id))
        work = asyncio.create_task(self._publish(run, reader, wait=wait))
        try:
            await asyncio.wait({heartbeat, work}, return_when=asyncio.FIRST_COMPLETED)
            if heartbeat.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                metrics.REPLAY_RUNS.labels("lost").inc()
                heartbeat.result()  # raises RunLostError
            await work
        finally:
            for task in (heartbeat, work):
                task.cancel()
            await asyncio.gather(heartbeat, work, return_exceptions=True)

        # 3. Record the final counts, or leave them to the leader.
        if not wait:
            await self.give_up(interrupted=False)
            return await self._row(run.run_id)
        counts = await self._retry("count", lambda: self.store.counts(run.run_id))
        if not await self.store.finish(run.run_id, self.owner, self.published, counts):
            metrics.REPLAY_RUNS.labels("lost").inc()
            raise RunLostError(f"replay run {run.run_id} changed hands before it was marked finished")
        metrics.REPLAY_RUNS.labels("finished").inc()
        self._report()
        elapsed = time.monotonic() - started
        logger.info(
            "replay run finished run_id=%s published=%d completed=%d rejected=%d failed=%d seconds=%.1f",
            run.run_id,
            self.published,
            counts.completed,
            counts.rejected,
            counts.failed,
            elapsed,
        )
        return await self._row(run.run_id)

    async def give_up(self, *, interrupted: bool) -> None:
        """Hand the run back after a cancellation.

        ``interrupted`` marks it stopped by hand, for ``graphinfer replay
        --resume``; otherwise the next leader resumes it at once. A run whose
        records are all published is always handed to the leader, which
        finishes it when the last results are stored.
        """
        if not self.run_id:
            return
        if interrupted and not self.all_published:
            await self.store.interrupt(self.run_id, self.owner)
            logger.info("replay run interrupted run_id=%s published=%d", self.run_id, self.published)
        else:
            await self.store.release(self.run_id, self.owner)
            logger.info("replay run released run_id=%s published=%d", self.run_id, self.published)
        metrics.REPLAY_RUNS.labels("released").inc()
        self._report()

    # --- steps -------------------------------------------------------------------

    async def _supersede(self, run: ReplayRun, content_hash: str, total: int) -> ReplayRun:
        tick = run.tick or datetime.now(UTC)
        new = NewRun(
            run_id=make_run_id(run.trigger, tick, content_hash),
            tick=tick,
            trigger=run.trigger,
            dataset=run.dataset,
            dataset_hash=content_hash,
            total=total,
        )
        replacement = await self.store.supersede(run, new, self.owner, self.options.stale_s)
        if replacement is None:
            raise RunLostError(f"replay run {run.run_id} changed hands before its data set was checked")
        logger.warning(
            "replay data set changed since the run was created; continuing as a new run "
            "run_id=%s superseded=%s dataset=%s",
            replacement.run_id,
            run.run_id,
            run.dataset,
        )
        self.run_id = replacement.run_id
        return replacement

    async def _publish(self, run: ReplayRun, reader: DatasetReader, *, wait: bool) -> None:
        finished = await self._retry("count", lambda: self.store.finished_count(run.run_id))
        resuming = finished > 0 or run.published > 0
        if resuming:
            await self._drain(run, finished)

        async for batch in reader.batches(self.options.read_batch_size):
            await self._publish_batch(run.run_id, batch, skip_stored=resuming)
        self.all_published = True
        if wait:
            await self._wait_until_stored(run.run_id)

    async def _drain(self, run: ReplayRun, finished: int) -> None:
        """Wait until the records sent before the interruption are stored or stop arriving."""
        logger.info(
            "replay run resuming run_id=%s stored=%d published_before=%d",
            run.run_id,
            finished,
            run.published,
        )
        quiet_since = time.monotonic()
        while finished < run.published and time.monotonic() - quiet_since < self.options.drain_quiet_s:
            await asyncio.sleep(self.options.poll_s * 2)
            now_finished = await self._retry("count", lambda: self.store.finished_count(run.run_id))
            if now_finished != finished:
                finished, quiet_since = now_finished, time.monotonic()

    async def _publish_batch(self, run_id: str, batch: list[Record], *, skip_stored: bool) -> None:
        errors: list[RecordError] = []
        messages: list[tuple[str, bytes]] = []
        for record in batch:
            if record.error is not None or record.body is None:
                errors.append(RecordError(record.position, record.location, record.error or "unreadable"))
                continue
            request_id, value = make_request(record, run_id)
            if len(value) > self.options.max_message_bytes:
                errors.append(
                    RecordError(
                        record.position,
                        record.location,
                        f"the request is {len(value):,} bytes, over the limit of "
                        f"{self.options.max_message_bytes:,} (GRAPHINFER_MAX_MESSAGE_BYTES)",
                    )
                )
                continue
            messages.append((request_id, value))
        if errors:
            logger.warning(
                "replay records unreadable run_id=%s count=%d first=%s reason=%s",
                run_id,
                len(errors),
                errors[0].location,
                errors[0].reason,
            )
            await self._retry("record errors", lambda: self.store.record_errors(run_id, errors))

        if skip_stored and messages:
            ids = [request_id for request_id, _ in messages]
            stored = await self._retry("read", lambda: self.store.stored_request_ids(ids))
            self.published += len(stored)
            messages = [message for message in messages if message[0] not in stored]

        while messages:
            room = await self._wait_for_room(len(messages))
            chunk, messages = messages[:room], messages[room:]
            await self._retry("produce", functools.partial(self._send, run_id, chunk))
            self.outstanding.update(dict.fromkeys(request_id for request_id, _ in chunk))
            self.published += len(chunk)
            self._report()

    async def _wait_for_room(self, wanted: int) -> int:
        """Return how many more records may be sent, waiting until at least one may."""
        while True:
            room = self.options.window - len(self.outstanding)
            if room > 0:
                return min(room, wanted)
            await asyncio.sleep(self.options.poll_s)
            await self._forget_stored()

    async def _forget_stored(self) -> None:
        """Drop the outstanding request ids that PostgreSQL has stored."""
        if not self.outstanding:
            return
        ids = list(self.outstanding)
        stored = await self._retry("read", lambda: self.store.stored_request_ids(ids))
        for request_id in stored:
            del self.outstanding[request_id]
        self._report()

    def _report(self) -> None:
        metrics.REPLAY_RECORDS.labels("published").set(self.published)
        metrics.REPLAY_RECORDS.labels("outstanding").set(len(self.outstanding))

    async def _send(self, run_id: str, chunk: list[tuple[str, bytes]]) -> None:
        headers = [(REPLAY_RUN_HEADER, run_id.encode()), ("graphinfer-schema", b"1")]
        deliveries = [
            await self.send(self.options.topic, request_id.encode(), value, headers)
            for request_id, value in chunk
        ]
        await asyncio.gather(*deliveries)

    async def _wait_until_stored(self, run_id: str) -> None:
        stalled_since = time.monotonic()
        last = -1
        while True:
            await self._forget_stored()
            if not self.outstanding:
                return
            if len(self.outstanding) != last:
                last, stalled_since = len(self.outstanding), time.monotonic()
            elif time.monotonic() - stalled_since > self.options.stale_s:
                logger.warning(
                    "replay run waiting for results run_id=%s outstanding=%d first=%s "
                    "seconds_without_progress=%.0f; check that a worker consumes the replay topic",
                    run_id,
                    len(self.outstanding),
                    next(iter(self.outstanding)),
                    time.monotonic() - stalled_since,
                )
                stalled_since = time.monotonic()
            await asyncio.sleep(self.options.poll_s * 2)

    async def _heartbeat(self, run_id: str) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_s)
            try:
                owned = await self.store.heartbeat(run_id, self.owner, self.published)
            except _TRANSIENT_ERRORS as exc:
                logger.warning("replay heartbeat failed run_id=%s error=%r; retrying", run_id, exc)
                continue
            if not owned:
                raise RunLostError(
                    f"replay run {run_id} was taken over by another process; its heartbeat was older than "
                    f"{self.options.stale_s:g} s (GRAPHINFER_REPLAY_STALE_S)"
                )

    async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        delay = 0.5
        while True:
            try:
                return await operation()
            except _TRANSIENT_ERRORS as exc:
                logger.warning(
                    "replay %s failed, retrying in %.1f s run_id=%s error=%r", what, delay, self.run_id, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _row(self, run_id: str) -> ReplayRun:
        row = await self.store.run(run_id)
        assert row is not None, f"replay run {run_id} vanished"
        return row
