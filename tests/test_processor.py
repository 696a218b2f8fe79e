"""BatchProcessor failure paths, in process: a message that breaks the worker's code, data errors."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from graphinfer.models.decode import Limits
from graphinfer.models.repository import ModelCatalog
from graphinfer.storage.db import DeadLetter, RequestRecord, StoredRequest
from graphinfer.streams.processor import BatchProcessor, Message, ServedModels, Topics


class MemoryDatabase:
    """Keeps what BatchProcessor writes; fails the first ``fail_writes`` writes with ``error``."""

    def __init__(self, fail_writes: int = 0, error: Exception | None = None) -> None:
        self.records: list[RequestRecord] = []
        self.dead_letters: list[DeadLetter] = []
        self.fail_writes = fail_writes
        self.error = error

    async def fetch_requests(self, request_ids: list[str]) -> dict[str, StoredRequest]:
        return {}

    async def write_batch(self, records: list[RequestRecord], dead_letters: list[DeadLetter]) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            assert self.error is not None
            raise self.error
        self.records.extend(records)
        self.dead_letters.extend(dead_letters)


class NoPool:
    async def run(self, jobs: list[Any], *, background: bool = False) -> list[Any]:
        assert not jobs, "these tests send no request that reaches the models"
        return []


class BreakingProcessor(BatchProcessor):
    """Raises an unexpected error while decoding the message at ``broken_offset``."""

    broken_offset = 1

    def _decode(self, item: Any) -> None:
        if item.message.offset == self.broken_offset:
            raise RuntimeError("a bug in the worker")
        super()._decode(item)


def _processor(cls: type[BatchProcessor], database: MemoryDatabase, sent: list[tuple[Any, ...]]) -> Any:
    async def send(topic: str, key: Any, value: Any, partition: Any, headers: Any) -> Any:
        sent.append((topic, key, value))

        async def delivered() -> None:
            return None

        return delivered()

    return cls(
        database=database,  # type: ignore[arg-type]
        models=ServedModels(catalog=ModelCatalog([]), pool=NoPool()),  # type: ignore[arg-type]
        send=send,
        topics=Topics("requests", "replay", "predictions", "replies", "dlq"),
        limits=Limits(),
        retry_max_delay_s=0.01,
    )


def _message(offset: int, value: bytes | None, key: bytes | None = None) -> Message:
    return Message(topic="requests", partition=0, offset=offset, key=key, value=value)


async def test_breaking_message_dead_lettered_internal() -> None:
    database = MemoryDatabase()
    sent: list[tuple[Any, ...]] = []
    processor = _processor(BreakingProcessor, database, sent)
    request = json.dumps({"request_id": "r-1", "graph": {"nodes": []}}).encode()

    await processor.process([_message(0, b"not json"), _message(1, request), _message(2, b"[]")])

    codes = {letter.offset: letter.code for letter in database.dead_letters}
    assert codes == {0: "invalid_json", 1: "internal", 2: "invalid_request"}
    assert [topic for topic, _, _ in sent].count("dlq") == 3
    assert processor.finished == {("requests", 0): 2}


async def test_data_error_not_retried_forever() -> None:
    error = asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence")
    database = MemoryDatabase(fail_writes=2, error=error)
    sent: list[tuple[Any, ...]] = []
    processor = _processor(BatchProcessor, database, sent)

    # The batch write fails twice with a data error: the batch, then its rerun.
    # One at a time, the message then stores normally.
    await processor.process([_message(0, b"not json")])

    assert [letter.code for letter in database.dead_letters] == ["invalid_json"]


async def test_connection_error_retried_until_stored() -> None:
    database = MemoryDatabase(fail_writes=3, error=ConnectionRefusedError(111, "refused"))
    sent: list[tuple[Any, ...]] = []
    processor = _processor(BatchProcessor, database, sent)

    await processor.process([_message(0, b"not json")])

    assert [letter.code for letter in database.dead_letters] == ["invalid_json"]
    assert processor.retrier.outages == {}


@pytest.mark.parametrize("header", [b"00-\x00garbage", b"not-a-traceparent"])
async def test_malformed_traceparent_not_stored(header: bytes) -> None:
    database = MemoryDatabase()
    sent: list[tuple[Any, ...]] = []
    processor = _processor(BatchProcessor, database, sent)
    request = json.dumps({"request_id": "r-2", "graph": {"nodes": []}, "task": "nope"}).encode()
    message = Message(
        topic="requests", partition=0, offset=0, key=None, value=request, headers={"traceparent": header}
    )

    await processor.process([message])

    [record] = database.records
    assert record.traceparent is None
