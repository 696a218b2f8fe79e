"""Retry the worker's database and broker calls, pausing consumption while they fail.

A batch keeps its messages until its outcomes are stored and its replies
delivered, so a failed read, store or produce is retried with capped
exponential backoff instead of dropping the batch. While a dependency is
unavailable the worker pauses its partitions (see
:class:`graphinfer.streams.driver.FetchWaitConsumer`), logs when the outage
starts and how long it lasted once it ends, and resumes.

An error that depends on the data being written, such as a string that
PostgreSQL cannot store or a reply over the broker's size limit, fails the
same way on every attempt. It is raised at once, so the batch can be split
and the one message that causes it set aside.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import asyncpg
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from graphinfer import metrics

logger = logging.getLogger(__name__)

RETRIED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    KafkaError,
    TimeoutError,
)
# SQLSTATE classes 22 (data exception), 23 (integrity constraint violation)
# and 54 (program limit exceeded) describe the rows, not the server.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.ProgramLimitExceededError,
    MessageSizeTooLargeError,
)
STEP_DEPENDENCY = {"read": "database", "store": "database", "produce": "broker"}


class FlowControl(Protocol):
    """A switch that pauses and resumes fetching without leaving the consumer group."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


class Retrier:
    """Retries of the batch steps, and the dependencies that are down."""

    def __init__(
        self, *, max_delay_s: float = 30.0, initial_delay_s: float = 0.5, flow: FlowControl | None = None
    ) -> None:
        self.max_delay_s = max_delay_s
        self.initial_delay_s = min(initial_delay_s, max_delay_s)
        self.flow = flow
        # Dependency name to the monotonic time its first failure was seen.
        self.outages: dict[str, float] = {}

    async def run(self, step: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``operation`` until it succeeds, but raise at once on an error in the data itself."""
        delay = self.initial_delay_s
        failures = 0
        while True:
            try:
                result = await operation()
            except DATA_ERRORS:
                raise
            except RETRIED_ERRORS as exc:
                failures += 1
                metrics.RETRIES.labels(step).inc()
                if failures == 1:
                    await self._outage_started(step, exc)
                logger.warning(
                    "%s failed, retrying in %.1f s attempt=%d error=%r", step, delay, failures, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay_s)
                continue
            if failures:
                await self._outage_ended(step, failures)
            return result

    async def _outage_started(self, step: str, exc: BaseException) -> None:
        dependency = STEP_DEPENDENCY.get(step, step)
        if dependency in self.outages:
            return
        first = not self.outages
        self.outages[dependency] = time.monotonic()
        logger.warning(
            "%s unavailable: %s failed error=%r; pausing consumption and retrying with backoff "
            "up to %.1f s (GRAPHINFER_BATCH_RETRY_MAX_DELAY_S)",
            dependency,
            step,
            exc,
            self.max_delay_s,
        )
        if first and self.flow is not None:
            await self.flow.pause()

    async def _outage_ended(self, step: str, failures: int) -> None:
        dependency = STEP_DEPENDENCY.get(step, step)
        started = self.outages.pop(dependency, None)
        if started is None:
            return
        logger.info(
            "%s available again after %.1f s (%d failed attempts of %s); resuming consumption",
            dependency,
            time.monotonic() - started,
            failures,
            step,
        )
        if not self.outages and self.flow is not None:
            await self.flow.resume()
