"""A Faust transport whose consumer uses graphinfer's fetch wait and can pause.

faust-streaming 0.15.3 builds its worker consumer with a fixed
``fetch_max_wait_ms=1500`` and no setting to change it. A broker that holds
a fetch for the whole wait even when data is ready (Tansu does) then adds
about a second to every hop. This transport sets the wait from
``GRAPHINFER_KAFKA_FETCH_MAX_WAIT_MS`` on the consumer Faust creates, before
that consumer starts and builds its fetcher.

Pausing happens on the aiokafka consumer, not through Faust's
``pause_partitions``. aiokafka 0.14.0 leaves the group once no fetch has
been in progress for ``max_poll_interval_ms``. faust-streaming 0.15.3
skips fetching altogether when its own set of active partitions is empty,
which happens both after ``pause_partitions`` and when a stream's buffer
is full. Paused at the aiokafka level, the partitions fetch nothing while
a keep-alive task in the consumer thread goes on polling them, so the
consumer stays in its group for as long as the pause lasts.

NOTE: a consumer evicted anyway (an event loop blocked for longer than the
session timeout, say) did not rejoin in a measurement with these versions,
so such a worker has to be restarted. Their code suggests why: aiokafka
rejoins only after a fetch, and Faust fetches only after the rejoin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiokafka
from aiokafka.errors import ConsumerStoppedError, KafkaError
from faust.exceptions import ConsumerNotStarted
from faust.transport.drivers import aiokafka as faust_aiokafka

from graphinfer import metrics

logger = logging.getLogger(__name__)

# How long one keep-alive poll of the paused partitions waits, in seconds.
_KEEPALIVE_POLL_S = 0.5


class FetchWaitConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    _keepalive: asyncio.Task[None] | None = None

    async def pause_fetching(self) -> set[Any]:
        """Pause every assigned partition and keep polling; return the partitions paused."""
        return set(await self.call_thread(self._pause_in_thread))

    async def resume_fetching(self) -> set[Any]:
        """Resume the partitions paused by :meth:`pause_fetching`; return them."""
        return set(await self.call_thread(self._resume_in_thread))

    # The methods below run in the consumer thread, on its event loop.

    async def _pause_in_thread(self) -> set[Any]:
        consumer = self._ensure_consumer()
        assigned = consumer.assignment()
        consumer.pause(*assigned)
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = asyncio.get_running_loop().create_task(
                self._poll_paused(consumer), name="graphinfer-paused-poll"
            )
        return assigned

    async def _resume_in_thread(self) -> set[Any]:
        keepalive, self._keepalive = self._keepalive, None
        if keepalive is not None:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
        consumer = self._ensure_consumer()
        paused = consumer.paused()
        consumer.resume(*paused)
        return paused

    async def _poll_paused(self, consumer: aiokafka.AIOKafkaConsumer) -> None:
        # Polling paused partitions returns no records but counts as a fetch
        # in progress, which is what keeps the consumer in its group.
        while True:
            # A rebalance during the pause assigns partitions that are not
            # paused yet; pause them too.
            unpaused = consumer.assignment() - consumer.paused()
            if unpaused:
                consumer.pause(*unpaused)
            paused = consumer.paused()
            try:
                if paused:
                    await consumer.getmany(*paused, timeout_ms=int(_KEEPALIVE_POLL_S * 1000))
                else:
                    await asyncio.sleep(_KEEPALIVE_POLL_S)
            except ConsumerStoppedError:
                return
            except KafkaError as exc:
                logger.debug("polling the paused partitions failed error=%r", exc)
                await asyncio.sleep(_KEEPALIVE_POLL_S)

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # NOTE: a private attribute of aiokafka 0.14.0's AIOKafkaConsumer, read
        # when start() creates the Fetcher. Both packages are pinned exactly,
        # and effective_fetch_max_wait_ms() reads the value back from the
        # running fetcher so a test notices if an upgrade moves it.
        consumer._fetch_max_wait_ms = transport.fetch_max_wait_ms
        return consumer


class FetchWaitConsumer(faust_aiokafka.Consumer):
    _thread: FetchWaitConsumerThread

    def _new_consumer_thread(self) -> FetchWaitConsumerThread:
        return FetchWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def pause_fetching(self) -> set[Any]:
        return await self._thread.pause_fetching()

    async def resume_fetching(self) -> set[Any]:
        return await self._thread.resume_fetching()


class FetchWaitTransport(faust_aiokafka.Transport):
    Consumer = FetchWaitConsumer
    fetch_max_wait_ms: int = 1500


def transport_class(fetch_max_wait_ms: int) -> type[FetchWaitTransport]:
    """Return a transport class whose consumers wait at most ``fetch_max_wait_ms``."""
    return type("FetchWaitTransport", (FetchWaitTransport,), {"fetch_max_wait_ms": fetch_max_wait_ms})


def effective_fetch_max_wait_ms(app: Any) -> int | None:
    """Read the fetch wait from the running consumer's fetcher, or ``None`` before it starts."""
    thread = getattr(app.consumer, "_thread", None)
    consumer = getattr(thread, "_consumer", None)
    fetcher = getattr(consumer, "_fetcher", None)
    return None if fetcher is None else int(fetcher._fetch_max_wait_ms)


class ConsumerPause:
    """Pauses and resumes the app's consumer for :class:`graphinfer.streams.retry.Retrier`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def pause(self) -> None:
        try:
            partitions = await self.app.consumer.pause_fetching()
        except (ConsumerNotStarted, ConsumerStoppedError) as exc:
            logger.warning("could not pause consumption error=%r", exc)
            return
        metrics.PAUSED.set(1)
        logger.info("consumption paused partitions=%s", describe_partitions(partitions))

    async def resume(self) -> None:
        try:
            partitions = await self.app.consumer.resume_fetching()
        except (ConsumerNotStarted, ConsumerStoppedError) as exc:
            logger.warning("could not resume consumption error=%r", exc)
            return
        metrics.PAUSED.set(0)
        logger.info("consumption resumed partitions=%s", describe_partitions(partitions))


def describe_partitions(partitions: set[Any]) -> str:
    """Format topic partitions for a log line as ``topic=[0,1] other=[0]``."""
    by_topic: dict[str, list[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return " ".join(f"{topic}={sorted(numbers)}" for topic, numbers in sorted(by_topic.items())) or "none"
