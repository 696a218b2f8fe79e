"""Watch the broker from the worker: reachability, and topics that disappeared.

The Kafka clients reconnect by themselves. A broker that keeps no data
(the embedded Tansu broker, or any broker whose storage was wiped) comes
back without the worker's topics, though, so the consumer has nothing to
be assigned and replies have nowhere to go. Every
``GRAPHINFER_KAFKA_TOPIC_CHECK_INTERVAL_S`` seconds the watch lists the
topics, logs when the broker stops answering and how long it was away,
creates missing topics again with the configured partition counts, and
logs what the loss means: which offsets this worker had finished, and that
messages published but not yet consumed before the loss are gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from aiokafka.errors import KafkaError

from graphinfer import metrics
from graphinfer.broker import connect_admin, ensure_topics, partition_counts
from graphinfer.errors import ConfigurationError
from graphinfer.settings import Settings

logger = logging.getLogger(__name__)

_CHECK_TIMEOUT_S = 5.0

FinishedOffsets = Callable[[], Mapping[tuple[str, int], int]]


class BrokerWatch:
    """Periodic check of the broker and the worker's topics."""

    def __init__(self, settings: Settings, finished_offsets: FinishedOffsets) -> None:
        self.settings = settings
        self.finished_offsets = finished_offsets
        self.unreachable_since: float | None = None

    async def run(self) -> None:
        interval = self.settings.kafka_topic_check_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except ConfigurationError as exc:
                # A topic exists with another partition count, which only the operator can fix.
                logger.error("topic check failed: %s", exc)

    async def check(self) -> None:
        """Check once: log reachability changes and create missing topics again."""
        expected = self.settings.topic_partitions()
        try:
            admin = await connect_admin(self.settings, timeout_s=_CHECK_TIMEOUT_S)
        except ConfigurationError as exc:
            self._unreachable(exc)
            return
        try:
            counts = await partition_counts(admin, list(expected))
        except (KafkaError, OSError, TimeoutError) as exc:
            self._unreachable(exc)
            return
        finally:
            await admin.close()
        self._reachable()

        missing = sorted(topic for topic in expected if topic not in counts)
        if missing:
            await self._recreate(missing, expected)

    def _unreachable(self, exc: BaseException) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
            logger.warning(
                "broker unreachable at %s (GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS) error=%s; the Kafka clients "
                "keep reconnecting",
                self.settings.kafka_bootstrap_servers,
                exc,
            )

    def _reachable(self) -> None:
        if self.unreachable_since is not None:
            logger.info("broker reachable again after %.1f s", time.monotonic() - self.unreachable_since)
            self.unreachable_since = None

    async def _recreate(self, missing: list[str], expected: Mapping[str, int]) -> None:
        await ensure_topics(self.settings)
        for topic in missing:
            metrics.TOPICS_RECREATED.labels(topic).inc()
        # Clients may recreate a topic on their own before this check sees it
        # missing (Tansu creates a topic on first use), so any missing topic
        # counts as a sign that the broker lost its data, and the progress on
        # every topic this worker consumes is logged.
        finished = self.finished_offsets()
        progress = " ".join(
            f"{topic}:{partition}:{offset}" for (topic, partition), offset in sorted(finished.items())
        )
        logger.warning(
            "topics missing from the broker, created again: %s; the messages and committed offsets they held "
            "are lost (a broker that keeps no data restarted, or the topics were deleted). Last offsets this "
            "worker finished before the loss, as topic:partition:offset: %s; messages published after those "
            "and not consumed before the loss are gone",
            " ".join(f"{topic}(partitions={expected[topic]})" for topic in missing),
            progress or "none",
        )
