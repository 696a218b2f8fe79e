"""A Faust transport whose consumer uses graphinfer's fetch wait.

faust-streaming 0.15.3 builds its worker consumer with a fixed
``fetch_max_wait_ms=1500`` and no setting to change it. A broker that holds
a fetch for the whole wait even when data is ready (Tansu does) then adds
about a second to every hop. This transport sets the wait from
``GRAPHINFER_KAFKA_FETCH_MAX_WAIT_MS`` on the consumer Faust creates, before
that consumer starts and builds its fetcher.
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers import aiokafka as faust_aiokafka


class FetchWaitConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # NOTE: a private attribute of aiokafka 0.14.0's AIOKafkaConsumer, read
        # when start() creates the Fetcher. Both packages are pinned exactly,
        # and effective_fetch_max_wait_ms() reads the value back from the
        # running fetcher so a test notices if an upgrade moves it.
        consumer._fetch_max_wait_ms = transport.fetch_max_wait_ms
        return consumer


class FetchWaitConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> FetchWaitConsumerThread:
        return FetchWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)


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
