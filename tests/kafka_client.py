"""A test client that publishes requests and collects replies and dead letters by id."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import RecordMetadata


class KafkaTestClient:
    """Publishes to the worker's request topic and reads its output topics from the beginning."""

    def __init__(self, environment: dict[str, str]) -> None:
        self.environment = environment
        self.bootstrap = environment["GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS"]
        self.request_topic = environment["GRAPHINFER_REQUEST_TOPIC"]
        self.prediction_topic = environment["GRAPHINFER_PREDICTION_TOPIC"]
        self.dead_letter_topic = environment["GRAPHINFER_DEAD_LETTER_TOPIC"]
        self.database_url = environment["GRAPHINFER_DATABASE_URL"]
        self.replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.dead_letters: list[Any] = []
        self._changed = asyncio.Condition()
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, max_request_size=2_000_000)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, fetch_max_wait_ms=10, group_id=None
        )
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        await self._consumer.topics()  # refreshes metadata so the topics' partitions are known
        partitions = []
        for topic in (self.prediction_topic, self.dead_letter_topic):
            for partition in self._consumer.partitions_for_topic(topic) or ():
                partitions.append(TopicPartition(topic, partition))
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning()
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._consumer.stop()
        await self._producer.stop()

    async def _read(self) -> None:
        async for message in self._consumer:
            async with self._changed:
                if message.topic == self.dead_letter_topic:
                    self.dead_letters.append(message)
                else:
                    reply = json.loads(message.value)
                    self.replies[reply.get("request_id")].append(reply)
                self._changed.notify_all()

    async def publish(
        self,
        value: bytes | dict[str, Any] | None,
        *,
        key: bytes | str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> RecordMetadata:
        """Publish one message to the request topic; return where it landed."""
        if isinstance(value, dict):
            if key is None and isinstance(value.get("request_id"), str):
                key = value["request_id"]
            value = json.dumps(value).encode()
        if isinstance(key, str):
            key = key.encode()
        return await self._producer.send_and_wait(self.request_topic, value, key=key, headers=headers or [])

    async def wait_for_replies(
        self, request_id: str, count: int = 1, timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        async def enough() -> list[dict[str, Any]]:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.replies.get(request_id, [])) >= count)
                return list(self.replies[request_id])

        return await asyncio.wait_for(enough(), timeout)

    async def wait_for_dead_letter(self, predicate: Any, timeout: float = 60.0) -> Any:
        async def found() -> Any:
            async with self._changed:
                await self._changed.wait_for(lambda: any(predicate(letter) for letter in self.dead_letters))
                return next(letter for letter in self.dead_letters if predicate(letter))

        return await asyncio.wait_for(found(), timeout)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        connection = await asyncpg.connect(self.database_url)
        await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        try:
            return await connection.fetch(query, *args)
        finally:
            await connection.close()
