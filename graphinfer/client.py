"""A small Kafka client for scripts: publish requests from a file, print the replies."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from graphinfer.settings import Settings


def read_requests(path: Path) -> list[dict[str, Any]]:
    """Read one JSON request, a JSON list of them, or JSON Lines; give each a request_id."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    documents: list[Any]
    if stripped.startswith("["):
        documents = json.loads(text)
    elif stripped.startswith("{") and "\n{" not in stripped.strip():
        documents = [json.loads(text)]
    else:
        documents = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{number} is not valid JSON: {exc.msg}; fix the line or remove it"
                ) from None
    requests = []
    for position, document in enumerate(documents):
        if not isinstance(document, dict):
            raise ValueError(f"{path}: item {position} is a {type(document).__name__}, not a request object")
        if "graph" not in document and "nodes" in document:
            # A bare node-link graph: wrap it as a request.
            document = {"graph": document}
        document.setdefault("request_id", f"send-{uuid.uuid4().hex}")
        requests.append(document)
    return requests


async def send_file(
    settings: Settings, path: Path, *, timeout_s: float, echo: Callable[[str], None] = print
) -> int:
    """Publish every request in ``path`` and echo each reply; return how many got none."""
    requests = read_requests(path)
    options = settings.kafka_client_options()
    producer = AIOKafkaProducer(**options, max_request_size=settings.max_message_bytes + 65_536)
    consumer = AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=10)
    await producer.start()
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [
            TopicPartition(settings.prediction_topic, partition)
            for partition in consumer.partitions_for_topic(settings.prediction_topic) or ()
        ]
        consumer.assign(partitions)
        # The end offsets some brokers report are wrong (the embedded broker's
        # are), so read from the start and match replies by request_id.
        await consumer.seek_to_beginning(*partitions)
        waiting = {request["request_id"] for request in requests}
        for request in requests:
            await producer.send_and_wait(
                settings.request_topic,
                json.dumps(request, separators=(",", ":")).encode(),
                key=str(request["request_id"]).encode(),
            )
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    reply = json.loads(record.value)
                    if reply.get("request_id") in waiting:
                        waiting.discard(reply["request_id"])
                        echo(json.dumps(reply, ensure_ascii=False))
        return len(waiting)
    finally:
        await asyncio.gather(producer.stop(), consumer.stop())
