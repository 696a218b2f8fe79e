"""The replay leader: fires each schedule tick once and publishes the runs.

Every worker runs a :class:`ReplayCoordinator`. The one holding a
PostgreSQL advisory lock leads. Faust's own leader is not used, because
Faust (faust-streaming 0.15.3) has no leader while its consumer group
rebalances, and its crontab skips a tick due then. The lock lives on one connection and PostgreSQL releases it
when that connection closes, so a leader that dies hands over within a
lock poll. The lock only chooses who does the work. That a tick fires once
is enforced by :meth:`ReplayStore.claim_tick`, and that a run has one
publisher by the owner column, so a short overlap of two leaders is safe.

While leading, two tasks run side by side:

1. the timer sleeps until the next tick and claims it, inserting a pending run;
2. the run loop takes pending runs and runs whose owner stopped heartbeating,
   and publishes each in its own task, one at a time.

A long run therefore never delays the timer: the next tick is claimed on
time and its run waits in ``replay_runs`` until the current one finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from graphinfer import metrics
from graphinfer.replay.ids import make_run_id
from graphinfer.replay.publisher import PublishOptions, RunLostError, RunPublisher
from graphinfer.replay.schedule import CronSchedule
from graphinfer.replay.sources import DatasetError, DatasetReader, DatasetSpec
from graphinfer.settings import Settings
from graphinfer.storage.replay import NewRun, ReplayRun, ReplayStore

logger = logging.getLogger(__name__)

#: A wake-up this early for the awaited tick still fires it; asyncio timers
#: and wall-clock adjustments can wake a sleeper slightly before its time.
EARLY_WAKE_TOLERANCE_S = 1.0
#: Maximum seconds of one sleep, so a wall-clock jump is noticed within it.
MAX_SLEEP_S = 30.0

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]


def utc_now() -> datetime:
    return datetime.now(UTC)


def leader_lock_key(app_id: str) -> int:
    """Return the advisory lock key of one deployment's replay leader (a signed 64-bit integer)."""
    digest = hashlib.sha256(f"graphinfer-replay-leader:{app_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def dataset_spec(settings: Settings) -> DatasetSpec | None:
    """Return the configured data set, or ``None`` when the scheduled replay is off."""
    if settings.replay_dataset_query:
        return DatasetSpec.from_query(settings.replay_dataset_query)
    if settings.replay_dataset is not None:
        return DatasetSpec.from_path(settings.replay_dataset)
    return None


def publish_options(settings: Settings) -> PublishOptions:
    return PublishOptions(
        topic=settings.replay_topic,
        window=settings.replay_window,
        stale_s=settings.replay_stale_s,
        max_message_bytes=settings.max_message_bytes,
    )


class TickTimer:
    """Maps wake-ups to schedule ticks and claims each tick once.

    The tick a wake-up belongs to comes from the schedule and the last fired
    tick stored in PostgreSQL, never from the wake-up time alone. A wake-up
    up to :data:`EARLY_WAKE_TOLERANCE_S` early fires the tick it waited for.
    A late one fires that tick, or the latest tick passed when it is later
    than a whole period.
    """

    def __init__(
        self,
        schedule: CronSchedule,
        store: ReplayStore,
        app_id: str,
        spec: DatasetSpec,
        *,
        missed_ticks: str = "latest",
        database_url: str | None = None,
        clock: Clock = utc_now,
        on_run: Callable[[], None] = lambda: None,
    ) -> None:
        self.schedule = schedule
        self.store = store
        self.app_id = app_id
        self.spec = spec
        self.missed_ticks = missed_ticks
        self.database_url = database_url
        self.clock = clock
        self.on_run = on_run

    async def start(self) -> datetime | None:
        """Handle the ticks that passed while no process led; return the tick fired, if any.

        The first start of a deployment records the latest past tick without
        firing it, so a new deployment does not replay at once.
        """
        now = self.clock()
        latest = self.schedule.latest_at_or_before(now)
        last = await self.store.last_tick(self.app_id)
        if last is None:
            recorded = await self.store.start_schedule(self.app_id, latest)
            logger.info("replay schedule starts after tick=%s", recorded.isoformat())
            return None
        if latest <= last:
            return None
        missed = self.schedule.ticks_between(last, latest)
        if self.missed_ticks == "skip":
            if await self.store.claim_tick(self.app_id, latest, run=None):
                logger.warning(
                    "replay ticks missed while no worker led, skipped count=%d last=%s "
                    "(GRAPHINFER_REPLAY_MISSED_TICKS=skip)",
                    len(missed),
                    latest.isoformat(),
                )
            return None
        logger.warning(
            "replay ticks missed while no worker led count=%d; running the latest tick=%s "
            "(GRAPHINFER_REPLAY_MISSED_TICKS=latest)",
            len(missed),
            latest.isoformat(),
        )
        return latest if await self.fire(latest) else None

    async def next_tick(self) -> datetime:
        last = await self.store.last_tick(self.app_id)
        return self.schedule.next_after(last or self.clock())

    async def on_wake(self) -> datetime | None:
        """Fire the tick this wake-up belongs to; return it, or ``None`` when none is due."""
        now = self.clock()
        last = await self.store.last_tick(self.app_id)
        if last is None:
            await self.store.start_schedule(self.app_id, self.schedule.latest_at_or_before(now))
            return None
        awaited = self.schedule.next_after(last)
        if (awaited - now).total_seconds() > EARLY_WAKE_TOLERANCE_S:
            return None
        due = max(awaited, self.schedule.latest_at_or_before(now))
        return due if await self.fire(due) else None

    async def fire(self, tick: datetime) -> bool:
        """Claim ``tick`` and insert its pending run; false when another process claimed it first."""
        reader = DatasetReader(self.spec, self.database_url)
        try:
            summary = await reader.summary()
            run = NewRun(
                run_id=make_run_id("schedule", tick, summary.content_hash),
                tick=tick,
                trigger="schedule",
                dataset=self.spec.stored_form(),
                dataset_hash=summary.content_hash,
                total=summary.total,
            )
        except DatasetError as exc:
            unreadable = hashlib.sha256(f"unreadable:{self.spec.stored_form()}".encode()).hexdigest()
            run = NewRun(
                run_id=make_run_id("schedule", tick, unreadable),
                tick=tick,
                trigger="schedule",
                dataset=self.spec.stored_form(),
                dataset_hash=unreadable,
                status="failed",
                error=str(exc),
            )
            logger.error(
                "replay tick fired but the data set is unreadable tick=%s error=%s", tick.isoformat(), exc
            )
        if not await self.store.claim_tick(self.app_id, tick, run):
            logger.info("replay tick already fired elsewhere tick=%s", tick.isoformat())
            return False
        logger.info("replay tick fired tick=%s run_id=%s", tick.isoformat(), run.run_id)
        waiting = await self.store.pending_count()
        metrics.REPLAY_PENDING.set(waiting)
        if waiting > 1:
            # One run per tick: when runs take longer than the interval, they queue.
            logger.warning(
                "replay runs are queueing pending=%d; a run takes longer than the interval of "
                "GRAPHINFER_REPLAY_SCHEDULE; widen the interval, add workers, or raise "
                "GRAPHINFER_REPLAY_SHARE if online traffic slows the replay",
                waiting,
            )
        self.on_run()
        return True


class ReplayCoordinator:
    """A worker's contender for replay leadership that, while leading, fires ticks and publishes runs."""

    def __init__(
        self,
        settings: Settings,
        store: ReplayStore,
        owner: str,
        *,
        clock: Clock = utc_now,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner
        self.clock = clock
        self.sleep = sleep
        self.spec = dataset_spec(settings)
        self.schedule = CronSchedule(settings.replay_schedule, settings.replay_timezone)
        self.poll_s = min(5.0, settings.replay_stale_s / 2)
        self.is_leader = False
        self._work_waiting = asyncio.Event()

    def describe_schedule(self) -> str:
        if self.spec is None:
            return (
                "replay schedule off: neither GRAPHINFER_REPLAY_DATASET nor GRAPHINFER_REPLAY_DATASET_QUERY "
                "is set; runs started with graphinfer replay are still resumed"
            )
        tick = self.schedule.next_after(self.clock())
        return (
            f"replay schedule '{self.schedule.expression}' timezone={self.schedule.timezone} "
            f"next_tick={self.schedule.local(tick).isoformat()} ({tick.isoformat()}) dataset={self.spec} "
            f"missed_ticks={self.settings.replay_missed_ticks}"
        )

    async def run(self) -> None:
        """Compete for leadership until cancelled."""
        logger.info("%s", self.describe_schedule())
        connection: asyncpg.Connection | None = None
        try:
            while True:
                connection = await self._lock_connection(connection)
                if connection is not None and await self._try_lock(connection):
                    await self._lead(connection)
                    connection = None
                await self.sleep(self.poll_s)
        finally:
            if connection is not None:
                await _close(connection)

    # --- leadership --------------------------------------------------------------

    async def _lock_connection(self, connection: asyncpg.Connection | None) -> asyncpg.Connection | None:
        if connection is not None and not connection.is_closed():
            return connection
        try:
            return await asyncpg.connect(self.settings.dsn, timeout=self.settings.database_connect_timeout_s)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            logger.warning("replay leader election cannot reach PostgreSQL error=%r; retrying", exc)
            return None

    async def _try_lock(self, connection: asyncpg.Connection) -> bool:
        try:
            return bool(
                await connection.fetchval(
                    "SELECT pg_try_advisory_lock($1)", leader_lock_key(self.settings.app_id)
                )
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning("replay leader election failed error=%r; retrying", exc)
            await _close(connection)
            return False

    async def _lead(self, connection: asyncpg.Connection) -> None:
        """Lead until the lock connection fails; close it on the way out, which frees the lock."""
        logger.info("replay leader elected worker=%s", self.owner)
        self.is_leader = True
        producer = AIOKafkaProducer(
            **self.settings.kafka_client_options(),
            client_id=f"{self.settings.app_id}-replay",
            acks="all",
            linger_ms=5,
            max_request_size=max(1_048_576, self.settings.max_message_bytes + 65_536),
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            await producer.start()
            tasks = [
                asyncio.create_task(self._watch_lock(connection), name="replay-lock"),
                asyncio.create_task(self._run_loop(producer), name="replay-runs"),
            ]
            if self.spec is not None:
                tasks.append(asyncio.create_task(self._timer(self.spec), name="replay-timer"))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    logger.error(
                        "replay leader task failed task=%s error=%r", task.get_name(), task.exception()
                    )
        except (OSError, TimeoutError, KafkaError) as exc:
            logger.warning("replay leader cannot reach Kafka error=%r; stepping down", exc)
        finally:
            self.is_leader = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await producer.stop()
            await _close(connection)
            logger.info("replay leadership released worker=%s", self.owner)

    async def _watch_lock(self, connection: asyncpg.Connection) -> None:
        while True:
            await self.sleep(self.poll_s)
            try:
                await connection.fetchval("SELECT 1")
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("replay leader lost its lock connection error=%r", exc)
                return

    # --- the timer and the run loop --------------------------------------------------

    async def _timer(self, spec: DatasetSpec) -> None:
        timer = TickTimer(
            self.schedule,
            self.store,
            self.settings.app_id,
            spec,
            missed_ticks=self.settings.replay_missed_ticks,
            database_url=self.settings.dsn,
            clock=self.clock,
            on_run=self._work_waiting.set,
        )
        await timer.start()
        while True:
            tick = await timer.next_tick()
            logger.debug("replay timer sleeping until tick=%s", tick.isoformat())
            await self._sleep_until(tick)
            await timer.on_wake()

    async def _sleep_until(self, instant: datetime) -> None:
        while True:
            remaining = (instant - self.clock()).total_seconds()
            if remaining <= 0:
                return
            await self.sleep(min(remaining, MAX_SLEEP_S))

    async def _run_loop(self, producer: AIOKafkaProducer) -> None:
        while True:
            run = await self.store.claim_next(self.owner, self.settings.replay_stale_s)
            if run is not None:
                metrics.REPLAY_PENDING.set(await self.store.pending_count())
            if run is None:
                self._work_waiting.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work_waiting.wait(), timeout=self.poll_s)
                continue
            await self._execute(run, producer)

    async def _execute(self, run: ReplayRun, producer: AIOKafkaProducer) -> None:
        async def send(
            topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
        ) -> Awaitable[Any]:
            return await producer.send(topic, value, key=key, headers=headers)

        publisher = RunPublisher(
            self.store, send, publish_options(self.settings), self.owner, database_url=self.settings.dsn
        )
        # The run gets its own task, so the timer keeps its schedule while it runs.
        task = asyncio.create_task(publisher.execute(run), name=f"replay-run-{run.run_id}")
        try:
            await task
        except RunLostError as exc:
            logger.warning("replay run lost run_id=%s reason=%s", run.run_id, exc)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # Shielded: the worker is stopping, and the next leader should
            # resume the run at once rather than after the stale limit.
            await asyncio.shield(publisher.give_up(interrupted=False))
            raise


async def _close(connection: asyncpg.Connection) -> None:
    with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        await connection.close(timeout=2)
