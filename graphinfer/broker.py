"""Kafka administration: connect, create graphinfer's topics and check their partition counts.

Topics are created explicitly, before any client can auto-create them:
Tansu auto-creates a missing topic with 4 partitions and Apache Kafka with
``num.partitions``, neither of which is the configured count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

from graphinfer.errors import ConfigurationError
from graphinfer.settings import Settings

logger = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


async def connect_admin(settings: Settings, timeout_s: float = 10.0) -> AIOKafkaAdminClient:
    """Connect an admin client, failing fast when no broker answers."""
    admin = AIOKafkaAdminClient(
        **settings.kafka_client_options(),
        client_id=f"{settings.app_id}-admin",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        await asyncio.wait_for(admin.start(), timeout=timeout_s)
    except (KafkaConnectionError, KafkaError, OSError, TimeoutError) as exc:
        await admin.close()
        raise ConfigurationError(
            f"no Kafka broker responded at {settings.kafka_bootstrap_servers} "
            f"(GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS) within {timeout_s:.0f} s: {exc!r}; "
            "start the broker or fix the setting"
        ) from None
    return admin


async def partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    existing = set(await admin.list_topics())
    wanted = [topic for topic in topics if topic in existing]
    if not wanted:
        return {}
    described = await admin.describe_topics(wanted)
    return {item["topic"]: len(item["partitions"]) for item in described if item["error_code"] == 0}


async def ensure_topics(settings: Settings, topics: Mapping[str, int] | None = None) -> dict[str, int]:
    """Create the missing topics and check the partition counts of existing ones.

    With ``GRAPHINFER_CREATE_TOPICS=false`` nothing is created and a missing
    topic is an error. Returns each topic's partition count.
    """
    topics = dict(topics or settings.topic_partitions())
    admin = await connect_admin(settings)
    try:
        counts = await partition_counts(admin, list(topics))
        missing = [topic for topic in topics if topic not in counts]
        if missing and not settings.create_topics:
            raise ConfigurationError(
                f"topics {', '.join(missing)} do not exist and GRAPHINFER_CREATE_TOPICS is false; "
                "create them on the cluster or set GRAPHINFER_CREATE_TOPICS=true"
            )
        if missing:
            response = await admin.create_topics(
                [NewTopic(topic, topics[topic], settings.topic_replication_factor) for topic in missing]
            )
            for topic, error_code, *rest in response.topic_errors:
                if error_code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise ConfigurationError(
                        f"the broker refused to create topic {topic!r} (error code {error_code}: {rest}); "
                        "create it by hand or check the broker's permissions"
                    )
                if error_code == 0:
                    logger.info("topic created topic=%s partitions=%d", topic, topics[topic])
            counts = await partition_counts(admin, list(topics))
        for topic, expected in topics.items():
            found = counts.get(topic)
            if found is None:
                raise ConfigurationError(f"topic {topic!r} is still missing after creation; check the broker")
            if found != expected:
                raise ConfigurationError(
                    f"topic {topic!r} has {found} partitions but graphinfer is configured for {expected}; "
                    "set the matching GRAPHINFER_*_PARTITIONS setting to "
                    f"{found}, or recreate the topic with {expected} partitions"
                )
        return counts
    finally:
        await admin.close()
