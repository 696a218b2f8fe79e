"""The replay schedule: cron ticks in a time zone, with a fixed rule for daylight-saving changes.

A tick is an instant (an aware UTC datetime) at which the schedule fires.
croniter walks the schedule in local wall-clock time, and :meth:`CronSchedule.resolve`
turns each wall-clock time into an instant:

- a wall-clock time that does not exist (it falls in the hour skipped when
  clocks spring forward) fires at the first instant after the gap, as cron
  does: ``30 2 * * *`` in America/New_York on 2026-03-08 fires at 03:00 EDT;
- a wall-clock time that happens twice (clocks fall back) fires once, at its
  first occurrence: ``30 1 * * *`` on 2026-11-01 fires at 01:30 EDT and not
  again at 01:30 EST.

Several wall-clock times that resolve to one instant are one tick.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

FIVE_FIELDS = "MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK"
SIX_FIELDS = "SECOND MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK"
_ONE_DAY = timedelta(days=1)
_ONE_MICROSECOND = timedelta(microseconds=1)


class ScheduleError(ValueError):
    """The cron expression or the time zone is invalid; the message names the value and the reason."""


def check_expression(expression: str) -> str:
    """Validate a five-field cron expression, or six fields with seconds first; return it stripped.

    Raises :class:`ScheduleError` naming the expected form.
    """
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ScheduleError(
            f"{expression!r} has {len(fields)} fields; expected five-field cron, '{FIVE_FIELDS}' "
            f"such as '0 0 * * *', or six fields with seconds first, '{SIX_FIELDS}'"
        )
    seconds_first = len(fields) == 6
    if not croniter.is_valid(expression, second_at_beginning=seconds_first):
        raise ScheduleError(f"{expression!r} is not a valid cron expression; expected '{FIVE_FIELDS}'")
    try:
        croniter(expression, datetime(2000, 1, 1), second_at_beginning=seconds_first).get_next(datetime)
    except (CroniterBadDateError, CroniterBadCronError) as exc:
        raise ScheduleError(f"{expression!r} never fires ({exc}); check the day and month fields") from None
    return " ".join(fields)


def load_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleError(f"{name!r} is not an IANA time zone such as 'UTC' or 'Asia/Shanghai'") from exc


class CronSchedule:
    """A cron expression read in one IANA time zone."""

    def __init__(self, expression: str, timezone: str = "UTC") -> None:
        self.expression = check_expression(expression)
        self.timezone = timezone
        self.zone: tzinfo = load_zone(timezone)
        self._seconds_first = len(self.expression.split()) == 6

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r}, {self.timezone!r})"

    def next_after(self, instant: datetime) -> datetime:
        """Return the first tick strictly after ``instant``."""
        instant = _utc(instant)
        # Start from the earliest wall-clock reading the instant can have
        # around a DST change, then skip candidates that resolve too early
        # (those in the second pass through a repeated hour).
        start = _naive(instant + self._offset_extremes(instant)[0])
        candidates = self._walk(start, forward=True)
        for wall in candidates:
            tick = self.resolve(wall)
            if tick > instant:
                return tick
        raise AssertionError("unreachable: croniter yields candidates without end")

    def latest_at_or_before(self, instant: datetime) -> datetime:
        """Return the last tick at or before ``instant``."""
        instant = _utc(instant)
        # A wall-clock time up to one DST shift past the instant's own reading
        # can still resolve to an earlier instant, so the walk starts there.
        start = _naive(instant + self._offset_extremes(instant)[1]) + _ONE_MICROSECOND
        for wall in self._walk(start, forward=False):
            tick = self.resolve(wall)
            if tick <= instant:
                return tick
        raise AssertionError("unreachable: croniter yields candidates without end")

    def ticks_between(self, start: datetime, end: datetime) -> list[datetime]:
        """Return the ticks ``t`` with ``start < t <= end``, in order."""
        ticks: list[datetime] = []
        tick = self.next_after(start)
        while tick <= _utc(end):
            ticks.append(tick)
            tick = self.next_after(tick)
        return ticks

    def resolve(self, wall: datetime) -> datetime:
        """Return the instant at which the naive local wall-clock time ``wall`` fires."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if first == second:
            return first
        if _naive(first.astimezone(self.zone)) == wall:
            # The time happens twice; fold=0 is the first occurrence.
            return min(first, second)
        return self._gap_end(min(first, second), max(first, second))

    def local(self, instant: datetime) -> datetime:
        """Return ``instant`` in the schedule's zone, for messages and logs."""
        return _utc(instant).astimezone(self.zone)

    def _walk(self, start: datetime, *, forward: bool) -> Iterator[datetime]:
        iterator = croniter(self.expression, start, second_at_beginning=self._seconds_first)
        step = iterator.get_next if forward else iterator.get_prev
        while True:
            yield step(datetime)

    def _offset_extremes(self, instant: datetime) -> tuple[timedelta, timedelta]:
        # Zones change their UTC offset at most a few times a year, so the
        # offsets a day either side bound every reading near the instant.
        offsets = [
            (instant + delta).astimezone(self.zone).utcoffset() or timedelta(0)
            for delta in (-_ONE_DAY, timedelta(0), _ONE_DAY)
        ]
        return min(offsets), max(offsets)

    def _gap_end(self, before: datetime, after: datetime) -> datetime:
        """Return the first whole second in ``(before, after]`` with the offset in force at ``after``."""
        target = after.astimezone(self.zone).utcoffset()
        low, high = math.floor(before.timestamp()), math.ceil(after.timestamp())
        # Offsets change on whole seconds: ``low`` keeps the old offset and
        # ``high`` has the new one, so the search ends on the change.
        while high - low > 1:
            middle = (low + high) // 2
            if datetime.fromtimestamp(middle, self.zone).utcoffset() == target:
                high = middle
            else:
                low = middle
        return datetime.fromtimestamp(high, UTC)


def _utc(instant: datetime) -> datetime:
    if instant.tzinfo is None:
        raise ValueError(f"{instant!r} has no time zone; pass an aware datetime")
    return instant.astimezone(UTC)


def _naive(instant: datetime) -> datetime:
    return instant.replace(tzinfo=None)
