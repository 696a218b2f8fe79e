"""Online requests first: how the worker's replay agent yields to the online agent.

Both agents share one event loop and one inference pool, so replayed work
delays online work unless it yields. While online traffic was seen within
the last ``recent_s``, a replayed batch is processed in steps sized to
take about ``step_target_s`` each (from the time per replayed request the
steps before took, at least ``busy_step`` requests), and each step

1. waits until no online batch is in progress (at most ``max_wait_s``, so
   the replay still moves under continuous online load);
2. uses all pool processes but one (see :meth:`InferencePool.run`), so an
   online batch that arrives meanwhile finds a free process;
3. is followed by a pause sized so that replayed steps take at most
   ``replay_share`` of the worker's time.

Without online traffic a replayed batch is one step with no pause.

A step carries a fixed cost (reading what is stored, one database
transaction, waiting for the replies to be delivered) besides the work per
request, so steps of a fixed small size spend most of the replay's share on
that cost. Sized by time, a step grows until it takes ``step_target_s``,
which also bounds how long an online batch that arrives during a step can
wait for the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


class OnlineFirst:
    """A gate that delays replayed batches while online batches are in progress or recent."""

    def __init__(
        self,
        replay_share: float = 0.25,
        busy_step: int = 2,
        max_wait_s: float = 1.0,
        recent_s: float = 1.0,
        step_target_s: float = 0.05,
    ) -> None:
        if not 0.0 < replay_share <= 1.0:
            raise ValueError(f"replay_share is {replay_share!r}; it must lie in (0, 1]")
        self.replay_share = replay_share
        self.busy_step = busy_step
        self.step_target_s = step_target_s
        # Seconds per replayed request, smoothed over the steps so far; None before the first.
        self.seconds_per_request: float | None = None
        self.max_wait_s = max_wait_s
        self.recent_s = recent_s
        self._online_batches = 0
        self._last_online = float("-inf")
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def online_batch(self) -> AsyncIterator[None]:
        self._online_batches += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._online_batches -= 1
            self._last_online = time.monotonic()
            if self._online_batches == 0:
                self._idle.set()

    def online_recent(self) -> bool:
        return bool(self._online_batches) or time.monotonic() - self._last_online < self.recent_s

    def replay_steps(self, messages: Sequence[T]) -> Iterator[Sequence[T]]:
        """Yield the parts of a replayed batch, each sized when it is reached."""
        start = 0
        while start < len(messages):
            size = self.busy_step_size() if self.online_recent() else len(messages)
            yield messages[start : start + size]
            start += size

    def busy_step_size(self) -> int:
        """Return how many replayed requests one step takes while online traffic is recent."""
        if self.seconds_per_request is None or self.seconds_per_request <= 0:
            return self.busy_step
        return max(self.busy_step, int(self.step_target_s / self.seconds_per_request))

    @contextlib.asynccontextmanager
    async def replay_step(self, count: int = 0) -> AsyncIterator[None]:
        """Run one replayed step of ``count`` requests under the gate."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=self.max_wait_s)
        started = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            if count > 0:
                observed = elapsed / count
                previous = self.seconds_per_request
                self.seconds_per_request = observed if previous is None else 0.5 * previous + 0.5 * observed
            if self.online_recent():
                pause = elapsed * (1.0 - self.replay_share) / self.replay_share
                await asyncio.sleep(min(pause, self.max_wait_s))
