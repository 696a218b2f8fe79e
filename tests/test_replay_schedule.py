"""Replay ticks: cron in a time zone, daylight-saving changes, and one run per tick.

The timer tests drive :class:`TickTimer` with an injected clock against the
session's real PostgreSQL, so "once" is the database's compare-and-set and
not an in-memory flag.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from graphinfer import metrics
from graphinfer.embedded import drop_database, ensure_database
from graphinfer.replay.coordinator import TickTimer
from graphinfer.replay.schedule import CronSchedule, ScheduleError
from graphinfer.replay.sources import DatasetSpec
from graphinfer.storage.db import Database
from graphinfer.storage.replay import ReplayStore
from tests.conftest import Services


def utc(*parts: int, microsecond: int = 0) -> datetime:
    return datetime(*parts, microsecond=microsecond, tzinfo=UTC)


# --- tick arithmetic -----------------------------------------------------------------


def test_utc_daily_ticks() -> None:
    schedule = CronSchedule("0 0 * * *", "UTC")
    assert schedule.next_after(utc(2026, 1, 1, 12)) == utc(2026, 1, 2)
    assert schedule.next_after(utc(2026, 1, 2)) == utc(2026, 1, 3), "a tick is strictly after the instant"
    assert schedule.latest_at_or_before(utc(2026, 1, 2)) == utc(2026, 1, 2)
    assert schedule.latest_at_or_before(utc(2026, 1, 1, 23, 59, 59)) == utc(2026, 1, 1)


def test_shanghai_midnight_is_previous_utc_day() -> None:
    schedule = CronSchedule("0 0 * * *", "Asia/Shanghai")
    assert schedule.next_after(utc(2026, 1, 1, 12)) == utc(2026, 1, 1, 16)
    assert schedule.local(utc(2026, 1, 1, 16)).isoformat() == "2026-01-02T00:00:00+08:00"


def test_new_york_spring_forward_fires_at_gap_end() -> None:
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT, so 02:30 does not exist that day.
    schedule = CronSchedule("30 2 * * *", "America/New_York")
    ticks = schedule.ticks_between(utc(2026, 3, 7), utc(2026, 3, 10))
    assert ticks == [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]
    assert schedule.local(ticks[1]).isoformat() == "2026-03-08T03:00:00-04:00"


def test_new_york_fall_back_fires_first_occurrence() -> None:
    # 2026-11-01: 02:00 EDT falls back to 01:00 EST, so 01:30 happens twice.
    schedule = CronSchedule("30 1 * * *", "America/New_York")
    ticks = schedule.ticks_between(utc(2026, 10, 31), utc(2026, 11, 3))
    assert ticks == [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    assert schedule.local(ticks[1]).isoformat() == "2026-11-01T01:30:00-04:00"
    # During the second 01:30 (EST) the latest tick is still the first one.
    assert schedule.latest_at_or_before(utc(2026, 11, 1, 6, 45)) == utc(2026, 11, 1, 5, 30)
    assert schedule.next_after(utc(2026, 11, 1, 6, 15)) == utc(2026, 11, 2, 6, 30)


def test_quarter_hours_in_spring_gap_are_one_tick() -> None:
    schedule = CronSchedule("*/15 2 * * *", "America/New_York")
    assert schedule.ticks_between(utc(2026, 3, 8, 5), utc(2026, 3, 8, 9)) == [utc(2026, 3, 8, 7, 0)]


def test_seconds_field_comes_first() -> None:
    schedule = CronSchedule("*/2 * * * * *", "UTC")
    assert schedule.next_after(utc(2026, 1, 1, 0, 0, 0, microsecond=500_000)) == utc(2026, 1, 1, 0, 0, 2)
    assert schedule.latest_at_or_before(utc(2026, 1, 1, 0, 0, 3)) == utc(2026, 1, 1, 0, 0, 2)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("0 0 * *", "has 4 fields"),
        ("61 0 * * *", "not a valid cron expression"),
        ("0 0 30 2 *", "never fires"),
    ],
)
def test_invalid_expression_explained(expression: str, message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        CronSchedule(expression)
    assert message in str(caught.value)


# --- the timer against PostgreSQL ------------------------------------------------------


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
async def own_database(services: Services, session_id: str) -> AsyncIterator[str]:
    # Not the session database: the session worker leads there and would
    # take the pending and stale runs these tests create.
    name = f"graphinfer_replay_schedule_{session_id}"
    url = await ensure_database(services.server_url, name)
    yield url
    await drop_database(services.server_url, name)


@pytest.fixture
async def store(own_database: str) -> AsyncIterator[ReplayStore]:
    database = await Database.connect(own_database, min_size=1, max_size=4)
    yield ReplayStore(database.pool)
    await database.close()


@pytest.fixture
def dataset(tmp_path: Path) -> DatasetSpec:
    path = tmp_path / "graphs.jsonl"
    path.write_text(f'{{"id": "{uuid.uuid4().hex}", "nodes": [{{"id": 1}}], "edges": []}}\n')
    return DatasetSpec.from_path(path)


def make_timer(
    store: ReplayStore, dataset: DatasetSpec, expression: str, zone: str, clock: FakeClock, **options: str
) -> TickTimer:
    return TickTimer(
        CronSchedule(expression, zone), store, f"app-{uuid.uuid4().hex[:8]}", dataset, clock=clock, **options
    )


async def wake(timer: TickTimer, clock: FakeClock, at: datetime) -> datetime | None:
    clock.now = at
    return await timer.on_wake()


async def scheduled_ticks(store: ReplayStore, dataset: DatasetSpec) -> list[datetime]:
    rows = await store.pool.fetch(
        "SELECT tick FROM replay_runs WHERE dataset = $1 AND trigger = 'schedule' ORDER BY tick",
        dataset.stored_form(),
    )
    return [row["tick"] for row in rows]


async def test_timer_one_run_per_tick_despite_jitter(store: ReplayStore, dataset: DatasetSpec) -> None:
    clock = FakeClock(utc(2026, 1, 1, 9, 30))
    timer = make_timer(store, dataset, "0 * * * *", "UTC", clock)
    assert await timer.start() is None, "a new deployment does not fire a past tick"

    fired = [
        await wake(timer, clock, utc(2026, 1, 1, 9, 59, 59, microsecond=400_000)),  # 0.6 s early
        await wake(timer, clock, utc(2026, 1, 1, 10, 0, 0, microsecond=200_000)),  # the on-time wake-up
        await wake(timer, clock, utc(2026, 1, 1, 10, 0, 3)),  # a late repeat
        await wake(timer, clock, utc(2026, 1, 1, 10, 59, 58)),  # 2 s early: too early
        await wake(timer, clock, utc(2026, 1, 1, 11, 0, 7)),  # 7 s late
        await wake(timer, clock, utc(2026, 1, 1, 12, 0)),
    ]

    assert fired == [utc(2026, 1, 1, 10), None, None, None, utc(2026, 1, 1, 11), utc(2026, 1, 1, 12)]
    assert await scheduled_ticks(store, dataset) == [
        utc(2026, 1, 1, 10),
        utc(2026, 1, 1, 11),
        utc(2026, 1, 1, 12),
    ]


async def test_two_timers_share_each_tick(store: ReplayStore, dataset: DatasetSpec) -> None:
    clock_a, clock_b = FakeClock(utc(2026, 1, 1, 15)), FakeClock(utc(2026, 1, 1, 15))
    timer_a = make_timer(store, dataset, "0 0 * * *", "Asia/Shanghai", clock_a)
    timer_b = TickTimer(timer_a.schedule, store, timer_a.app_id, dataset, clock=clock_b)
    await timer_a.start()
    await timer_b.start()

    first = await wake(timer_a, clock_a, utc(2026, 1, 1, 15, 59, 59, microsecond=500_000))
    second = await wake(timer_b, clock_b, utc(2026, 1, 1, 16, 0, 2))

    assert first == utc(2026, 1, 1, 16), "midnight in Shanghai is 16:00 UTC"
    assert second is None
    assert await scheduled_ticks(store, dataset) == [utc(2026, 1, 1, 16)]


async def test_timer_spring_forward_one_run(store: ReplayStore, dataset: DatasetSpec) -> None:
    clock = FakeClock(utc(2026, 3, 7, 12))
    timer = make_timer(store, dataset, "30 2 * * *", "America/New_York", clock)
    await timer.start()

    fired = [
        await wake(timer, clock, utc(2026, 3, 8, 6, 30)),  # 01:30 EST, an hour before the jump
        await wake(timer, clock, utc(2026, 3, 8, 6, 59, 59, microsecond=500_000)),  # just before 03:00 EDT
        await wake(timer, clock, utc(2026, 3, 8, 7, 0, 1)),
        await wake(timer, clock, utc(2026, 3, 8, 7, 30)),  # 03:30 EDT, which "02:30 EST" would name
        await wake(timer, clock, utc(2026, 3, 9, 6, 30, 2)),
    ]

    assert fired == [None, utc(2026, 3, 8, 7), None, None, utc(2026, 3, 9, 6, 30)]
    assert await scheduled_ticks(store, dataset) == [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]


async def test_timer_fall_back_one_run(store: ReplayStore, dataset: DatasetSpec) -> None:
    clock = FakeClock(utc(2026, 10, 31, 12))
    timer = make_timer(store, dataset, "30 1 * * *", "America/New_York", clock)
    await timer.start()

    fired = [
        await wake(timer, clock, utc(2026, 11, 1, 5, 30)),  # 01:30 EDT, the first 01:30
        await wake(timer, clock, utc(2026, 11, 1, 6, 30)),  # 01:30 EST, the second 01:30
        await wake(timer, clock, utc(2026, 11, 1, 6, 30, 5)),
        await wake(timer, clock, utc(2026, 11, 2, 6, 29, 59, microsecond=800_000)),
    ]

    assert fired == [utc(2026, 11, 1, 5, 30), None, None, utc(2026, 11, 2, 6, 30)]
    assert await scheduled_ticks(store, dataset) == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


async def test_missed_ticks_latest_runs_one(store: ReplayStore, dataset: DatasetSpec) -> None:
    clock = FakeClock(utc(2026, 1, 1, 0, 30))
    timer = make_timer(store, dataset, "0 * * * *", "UTC", clock, missed_ticks="latest")
    await timer.start()
    # No process leads from 00:30 to 03:20: ticks 01:00, 02:00 and 03:00 pass.
    clock.now = utc(2026, 1, 1, 3, 20)
    leader = TickTimer(timer.schedule, store, timer.app_id, dataset, clock=clock, missed_ticks="latest")

    assert await leader.start() == utc(2026, 1, 1, 3)
    assert await wake(leader, clock, utc(2026, 1, 1, 4)) == utc(2026, 1, 1, 4)
    assert await scheduled_ticks(store, dataset) == [utc(2026, 1, 1, 3), utc(2026, 1, 1, 4)]


async def test_missed_ticks_skip_runs_none(store: ReplayStore, dataset: DatasetSpec) -> None:
    clock = FakeClock(utc(2026, 1, 1, 0, 30))
    timer = make_timer(store, dataset, "0 * * * *", "UTC", clock, missed_ticks="skip")
    await timer.start()
    clock.now = utc(2026, 1, 1, 3, 20)
    leader = TickTimer(timer.schedule, store, timer.app_id, dataset, clock=clock, missed_ticks="skip")

    assert await leader.start() is None
    assert await store.last_tick(timer.app_id) == utc(2026, 1, 1, 3), "the skipped tick counts as fired"
    assert await wake(leader, clock, utc(2026, 1, 1, 3, 59, 59, microsecond=900_000)) == utc(2026, 1, 1, 4)
    assert await scheduled_ticks(store, dataset) == [utc(2026, 1, 1, 4)]


async def test_queueing_runs_reported(
    store: ReplayStore, dataset: DatasetSpec, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(utc(2026, 1, 1, 0, 30))
    timer = make_timer(store, dataset, "0 * * * *", "UTC", clock)
    await timer.start()
    # Nothing takes the runs, as when each lasts longer than the hour between ticks.
    await wake(timer, clock, utc(2026, 1, 1, 1))
    with caplog.at_level("WARNING", logger="graphinfer.replay.coordinator"):
        await wake(timer, clock, utc(2026, 1, 1, 2))

    assert await scheduled_ticks(store, dataset) == [utc(2026, 1, 1, 1), utc(2026, 1, 1, 2)], (
        "one run per tick"
    )
    pending = metrics.REGISTRY.get_sample_value("graphinfer_replay_runs_pending")
    assert pending is not None
    assert pending >= 2
    assert "replay runs are queueing" in caplog.text
    assert "GRAPHINFER_REPLAY_SCHEDULE" in caplog.text


async def test_leader_change_after_tick_fires_nothing(store: ReplayStore, dataset: DatasetSpec) -> None:
    clock = FakeClock(utc(2026, 1, 1, 0, 30))
    old_leader = make_timer(store, dataset, "0 * * * *", "UTC", clock)
    await old_leader.start()
    assert await wake(old_leader, clock, utc(2026, 1, 1, 1)) == utc(2026, 1, 1, 1)
    # The old leader dies at 01:00:30; the new one starts at 01:00:45.
    clock.now = utc(2026, 1, 1, 1) + timedelta(seconds=45)
    new_leader = TickTimer(old_leader.schedule, store, old_leader.app_id, dataset, clock=clock)

    assert await new_leader.start() is None
    assert await wake(new_leader, clock, utc(2026, 1, 1, 1, 0, 50)) is None
    assert await scheduled_ticks(store, dataset) == [utc(2026, 1, 1, 1)]


async def test_unreadable_dataset_run_failed(store: ReplayStore, tmp_path: Path) -> None:
    missing = DatasetSpec.from_path(tmp_path / "missing.jsonl")
    clock = FakeClock(utc(2026, 1, 1, 0, 30))
    timer = make_timer(store, missing, "0 * * * *", "UTC", clock)
    await timer.start()

    assert await wake(timer, clock, utc(2026, 1, 1, 1)) == utc(2026, 1, 1, 1)
    [row] = await store.pool.fetch(
        "SELECT status, error FROM replay_runs WHERE dataset = $1", missing.stored_form()
    )
    assert row["status"] == "failed"
    assert "missing.jsonl does not exist" in row["error"]
