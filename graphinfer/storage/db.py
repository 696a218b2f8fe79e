"""The asyncpg connection pool and graphinfer's reads and writes.

Writes are idempotent, so a redelivered batch changes nothing:
``inference_requests`` moves only from ``pending`` to a terminal status,
``predictions`` keeps the first row per ``(request_id, model)``, and
``dead_letters`` the first row per ``(topic, partition, offset)`` and message hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from graphinfer.errors import ConfigurationError
from graphinfer.storage.migrations import migrate

logger = logging.getLogger(__name__)


@dataclass
class RequestRecord:
    """One request's terminal state, its reply and its per-model results."""

    request_id: str
    request_hash: str
    status: str
    source: str
    reply: dict[str, Any]
    received_at: datetime
    completed_at: datetime | None
    replay_run_id: str | None = None
    task: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    traceparent: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DeadLetter:
    topic: str
    partition: int
    offset: int
    request_id: str | None
    key: bytes | None
    value: bytes | None
    code: str
    reason: str


@dataclass(frozen=True)
class StoredRequest:
    request_id: str
    request_hash: str
    status: str
    reply: dict[str, Any] | None


async def _init_connection(connection: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await connection.set_type_codec(
            type_name, encoder=_dump_json, decoder=json.loads, schema="pg_catalog"
        )


def _dump_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def describe_dsn(dsn: str) -> str:
    """Return the DSN without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return dsn


class Database:
    """graphinfer's PostgreSQL access through one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 5,
        timeout_s: float = 5.0,
        run_migrations: bool = True,
    ) -> Database:
        """Open the pool and apply pending migrations.

        Raises :class:`ConfigurationError` naming ``GRAPHINFER_DATABASE_URL``
        when the server does not answer or refuses the connection.
        """
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, timeout=timeout_s, init=_init_connection
            )
            # With min_size=0 the pool connects lazily, so acquire once to check
            # the server now and apply migrations on the same connection.
            async with pool.acquire() as connection:
                if run_migrations:
                    await migrate(connection)
                else:
                    await connection.fetchval("SELECT 1")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ConfigurationError(
                f"cannot connect to PostgreSQL at {describe_dsn(dsn)} (GRAPHINFER_DATABASE_URL): {exc}; "
                "check that the server runs and the URL, user and database are right"
            ) from None
        database = cls(pool)
        return database

    async def close(self) -> None:
        await self.pool.close()

    async def fetch_requests(self, request_ids: Sequence[str]) -> dict[str, StoredRequest]:
        rows = await self.pool.fetch(
            "SELECT request_id, request_hash, status, reply FROM inference_requests WHERE request_id = ANY($1)",
            list(request_ids),
        )
        return {
            row["request_id"]: StoredRequest(
                row["request_id"], row["request_hash"], row["status"], row["reply"]
            )
            for row in rows
        }

    async def write_batch(self, records: Iterable[RequestRecord], dead_letters: Iterable[DeadLetter]) -> None:
        """Store a batch's requests, predictions and dead letters in one transaction."""
        records = list(records)
        dead_letters = list(dead_letters)
        async with self.pool.acquire() as connection, connection.transaction():
            if records:
                await connection.executemany(_UPSERT_REQUEST, [_request_row(record) for record in records])
                prediction_rows = [
                    _prediction_row(record.request_id, result)
                    for record in records
                    for result in record.results
                ]
                if prediction_rows:
                    await connection.executemany(_INSERT_PREDICTION, prediction_rows)
            if dead_letters:
                await connection.executemany(
                    _INSERT_DEAD_LETTER,
                    [
                        (
                            letter.topic,
                            letter.partition,
                            letter.offset,
                            letter.request_id,
                            letter.key,
                            letter.value,
                            letter.code,
                            letter.reason,
                            hashlib.sha256(letter.value or b"").hexdigest(),
                        )
                        for letter in dead_letters
                    ],
                )

    async def record_deployments(self, worker: str, deployments: Iterable[dict[str, Any]]) -> None:
        """Replace this worker's rows in ``model_deployments`` with what it serves now."""
        rows = list(deployments)
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute("DELETE FROM model_deployments WHERE worker = $1", worker)
            await connection.executemany(
                """
                INSERT INTO model_deployments
                    (worker, model, version, sha256, task, manifest, serving, loaded_at, heartbeat_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now())
                """,
                [
                    (
                        worker,
                        row["model"],
                        row["version"],
                        row["sha256"],
                        row["task"],
                        row["manifest"],
                        row["serving"],
                    )
                    for row in rows
                ],
            )

    async def heartbeat_deployments(self, worker: str) -> None:
        await self.pool.execute("UPDATE model_deployments SET heartbeat_at = now() WHERE worker = $1", worker)


_UPSERT_REQUEST = """
INSERT INTO inference_requests AS stored (
    request_id, request_hash, status, source, replay_run_id, task, metadata, reply, error_code,
    topic, kafka_partition, kafka_offset, traceparent, received_at, completed_at
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT (request_id) DO UPDATE SET
    status = EXCLUDED.status,
    reply = EXCLUDED.reply,
    error_code = EXCLUDED.error_code,
    topic = EXCLUDED.topic,
    kafka_partition = EXCLUDED.kafka_partition,
    kafka_offset = EXCLUDED.kafka_offset,
    completed_at = EXCLUDED.completed_at,
    updated_at = now()
WHERE (stored.status = 'pending' AND stored.request_hash = EXCLUDED.request_hash)
    OR stored.status = 'rejected'
"""

_INSERT_PREDICTION = """
INSERT INTO predictions (request_id, model, version, task, status, latency_ms, output, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (request_id, model) DO NOTHING
"""

_INSERT_DEAD_LETTER = """
INSERT INTO dead_letters
    (topic, kafka_partition, kafka_offset, request_id, message_key, message_value, code, reason, message_sha256)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (topic, kafka_partition, kafka_offset, message_sha256) DO NOTHING
"""


def _request_row(record: RequestRecord) -> tuple[Any, ...]:
    return (
        record.request_id,
        record.request_hash,
        record.status,
        record.source,
        record.replay_run_id,
        record.task,
        record.metadata,
        record.reply,
        record.error_code,
        record.topic,
        record.partition,
        record.offset,
        record.traceparent,
        record.received_at,
        record.completed_at,
    )


def _prediction_row(request_id: str, result: dict[str, Any]) -> tuple[Any, ...]:
    return (
        request_id,
        result["model"],
        result["version"],
        result["task"],
        result["status"],
        result.get("latency_ms"),
        result.get("output"),
        result.get("error"),
    )
