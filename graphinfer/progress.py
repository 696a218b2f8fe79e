"""Progress of long commands: a tqdm bar on a terminal, plain lines elsewhere.

``demo``, ``replay --wait``, ``bench`` and ``models train-demo`` open one
display with :func:`open_progress` and report the count done so far. On a
terminal the display is a tqdm bar with the count, rate and ETA, and log
records for the console are written above the bar so they do not tear it.
Off a terminal (a pipe, a file, a container log) the display writes a plain
line such as ``answered 120/1000 requests (12%) after 3.2 s`` at most every
``interval_s`` seconds, and always writes the last count when it closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

#: Minimum seconds between two plain progress lines.
PLAIN_INTERVAL_S = 5.0
#: Size assumed for a terminal that reports none.
FALLBACK_SIZE = os.terminal_size((80, 24))


class ProgressDisplay(Protocol):
    """The progress of one long operation, shown as a bar or as plain lines."""

    def update_to(self, done: int, detail: str = "") -> None:
        """Show that ``done`` items of the total are finished, with ``detail`` after the count."""

    def write(self, line: str) -> None:
        """Print a line of output above the progress, without tearing a bar."""

    def close(self) -> None:
        """Show the final count and end the display."""

    def __enter__(self) -> ProgressDisplay: ...

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None: ...


def open_progress(
    description: str,
    total: int,
    *,
    unit: str = "",
    stream: TextIO | None = None,
    interval_s: float = PLAIN_INTERVAL_S,
    initial: int = 0,
    clock: Callable[[], float] = time.monotonic,
) -> ProgressDisplay:
    """Open a progress display for ``total`` items on ``stream`` (default: stdout).

    Returns a :class:`ProgressBar` when ``stream.isatty()`` is true, and
    :class:`ProgressLines` otherwise. ``initial`` is the count already done
    before this process started, so the rate counts only the new work.
    """
    target = stream if stream is not None else sys.stdout
    if target.isatty():
        return ProgressBar(description, total, unit=unit, stream=target, initial=initial)
    return ProgressLines(
        description, total, unit=unit, stream=target, interval_s=interval_s, initial=initial, clock=clock
    )


class ProgressBar:
    """A tqdm bar redrawn in place, with console logging redirected above it while open."""

    def __init__(self, description: str, total: int, *, unit: str, stream: TextIO, initial: int = 0) -> None:
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=description,
            unit=unit or "it",
            file=stream,
            leave=True,
            **_width_options(stream),
        )
        self._done = initial
        self._logging = contextlib.ExitStack()
        if _logs_to_console():
            self._logging.enter_context(logging_redirect_tqdm())

    def update_to(self, done: int, detail: str = "") -> None:
        if detail:
            self._bar.set_postfix_str(detail, refresh=False)
        # tqdm counts increments, so a count that did not grow only redraws the detail.
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done
        else:
            self._bar.refresh()

    def write(self, line: str) -> None:
        self._bar.write(line, file=self._bar.fp)

    def close(self) -> None:
        self._logging.close()
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _width_options(stream: TextIO) -> dict[str, Any]:
    # NOTE: a pseudo-terminal that was never given a size reports 0 columns and 0
    # lines, and tqdm 4.70 then draws nothing at all, so such a terminal gets a fixed size.
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": FALLBACK_SIZE.columns, "nrows": FALLBACK_SIZE.lines}


def _logs_to_console() -> bool:
    return any(
        isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)
        for handler in logging.getLogger().handlers
    )


class ProgressLines:
    """Plain progress lines, at most one every ``interval_s`` seconds, and the last count on close."""

    def __init__(
        self,
        description: str,
        total: int,
        *,
        unit: str,
        stream: TextIO,
        interval_s: float = PLAIN_INTERVAL_S,
        initial: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.stream = stream
        self.interval_s = interval_s
        self._clock = clock
        self._started = clock()
        self._last_line_at = self._started
        self._state = (initial, "")
        self._written: tuple[int, str] | None = None
        self._closed = False

    def update_to(self, done: int, detail: str = "") -> None:
        self._state = (done, detail)
        now = self._clock()
        finished = self.total > 0 and done >= self.total
        if self._state != self._written and (finished or now - self._last_line_at >= self.interval_s):
            self._write_state(now)

    def write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._state != self._written:
            self._write_state(self._clock())

    def _write_state(self, now: float) -> None:
        done, detail = self._state
        percent = 100 * done // self.total if self.total else 100
        count = f"{done}/{self.total} {self.unit}" if self.unit else f"{done}/{self.total}"
        line = f"{self.description} {count} ({percent}%) after {now - self._started:.1f} s"
        self.write(f"{line}, {detail}" if detail else line)
        self._written = self._state
        self._last_line_at = now

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
