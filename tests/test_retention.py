"""Retention removes what is past its period and nothing else."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from graphinfer.storage.retention import RetentionPeriods, purge

pytestmark = pytest.mark.integration


@pytest.fixture
async def connection(worker, database_url: str) -> AsyncIterator[asyncpg.Connection]:
    # The session worker has applied the migrations to this database.
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def insert_request(
    connection: asyncpg.Connection, request_id: str, age_days: float, *, completed: bool = True
) -> None:
    await connection.execute(
        """
        INSERT INTO inference_requests (request_id, request_hash, status, source, reply, received_at, completed_at)
        VALUES ($1, 'h', $2, 'online', $3::jsonb, now() - make_interval(secs => $4),
                CASE WHEN $5 THEN now() - make_interval(secs => $4) END)
        """,
        request_id,
        "ok" if completed else "pending",
        json.dumps({"request_id": request_id}),
        age_days * 86_400,
        completed,
    )
    await connection.execute(
        """
        INSERT INTO predictions (request_id, model, version, task, status, created_at)
        VALUES ($1, 'm', 1, 'graph', 'ok', now() - make_interval(secs => $2))
        """,
        request_id,
        age_days * 86_400,
    )


async def insert_dead_letter(connection: asyncpg.Connection, offset: int, age_days: float) -> None:
    await connection.execute(
        """
        INSERT INTO dead_letters (topic, kafka_partition, kafka_offset, code, reason, created_at)
        VALUES ('retention-test', 0, $1, 'invalid_json', 'test', now() - make_interval(secs => $2))
        """,
        offset,
        age_days * 86_400,
    )


async def count(connection: asyncpg.Connection, query: str, *args: object) -> int:
    return int(await connection.fetchval(query, *args))


async def test_retention_removes_only_expired_rows(connection: asyncpg.Connection, unique_id: str) -> None:
    await insert_request(connection, f"{unique_id}-old", age_days=40)
    await insert_request(connection, f"{unique_id}-new", age_days=1)
    await insert_request(connection, f"{unique_id}-stuck", age_days=40, completed=False)
    await insert_dead_letter(connection, 900_001, age_days=20)
    await insert_dead_letter(connection, 900_002, age_days=2)

    await purge(connection, RetentionPeriods(requests_days=30, predictions_days=30, dead_letters_days=14))

    remaining = await connection.fetch(
        "SELECT request_id FROM inference_requests WHERE request_id LIKE $1 ORDER BY request_id",
        f"{unique_id}-%",
    )
    assert [row["request_id"] for row in remaining] == [f"{unique_id}-new"]
    assert (
        await count(connection, "SELECT count(*) FROM predictions WHERE request_id LIKE $1", f"{unique_id}-%")
        == 1
    )
    offsets = await connection.fetch(
        "SELECT kafka_offset FROM dead_letters WHERE topic = 'retention-test' ORDER BY kafka_offset"
    )
    assert [row["kafka_offset"] for row in offsets] == [900_002]


async def test_predictions_expire_before_requests(connection: asyncpg.Connection, unique_id: str) -> None:
    await insert_request(connection, f"{unique_id}-mid", age_days=10)
    await purge(connection, RetentionPeriods(requests_days=30, predictions_days=7, dead_letters_days=0))
    assert (
        await count(
            connection, "SELECT count(*) FROM inference_requests WHERE request_id = $1", f"{unique_id}-mid"
        )
        == 1
    )
    assert (
        await count(connection, "SELECT count(*) FROM predictions WHERE request_id = $1", f"{unique_id}-mid")
        == 0
    )


async def test_zero_days_keeps_everything(connection: asyncpg.Connection, unique_id: str) -> None:
    await insert_request(connection, f"{unique_id}-ancient", age_days=3_000)
    deleted = await purge(
        connection, RetentionPeriods(requests_days=0, predictions_days=0, dead_letters_days=0)
    )
    assert deleted == {"predictions": 0, "inference_requests": 0, "dead_letters": 0}
    assert (
        await count(
            connection, "SELECT count(*) FROM predictions WHERE request_id = $1", f"{unique_id}-ancient"
        )
        == 1
    )
