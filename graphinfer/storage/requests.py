"""The gateway's reads and writes of ``inference_requests``.

The gateway inserts a request as ``pending`` before it publishes it; the
worker later moves the row to a terminal status (see
:mod:`graphinfer.storage.db`). The gateway never changes a row the worker
has written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from graphinfer.storage.db import Database


@dataclass(frozen=True)
class RequestState:
    """A request row as the gateway needs it: owner, hash, status and reply."""

    request_id: str
    request_hash: str
    status: str
    tenant: str | None
    reply: dict[str, Any] | None
    source: str
    metadata: dict[str, str]
    received_at: datetime


async def insert_pending(
    database: Database,
    *,
    request_id: str,
    request_hash: str,
    tenant: str | None,
    task: str | None,
    metadata: dict[str, str],
    traceparent: str | None,
    received_at: datetime,
) -> bool:
    """Store a new online request as ``pending``; return False when the id is already stored."""
    inserted = await database.pool.fetchval(
        """
        INSERT INTO inference_requests
            (request_id, request_hash, status, source, task, tenant, metadata, traceparent, received_at)
        VALUES ($1, $2, 'pending', 'online', $3, $4, $5, $6, $7)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING true
        """,
        request_id,
        request_hash,
        task,
        tenant,
        metadata,
        traceparent,
        received_at,
    )
    return bool(inserted)


async def delete_pending(database: Database, request_id: str, request_hash: str) -> None:
    """Remove a pending row whose request could not be published, so a retry can publish it."""
    await database.pool.execute(
        "DELETE FROM inference_requests WHERE request_id = $1 AND request_hash = $2 AND status = 'pending'",
        request_id,
        request_hash,
    )


async def fetch_state(database: Database, request_id: str) -> RequestState | None:
    row = await database.pool.fetchrow(
        """
        SELECT request_id, request_hash, status, tenant, reply, source, metadata, received_at
        FROM inference_requests WHERE request_id = $1
        """,
        request_id,
    )
    if row is None:
        return None
    return RequestState(
        request_id=row["request_id"],
        request_hash=row["request_hash"],
        status=row["status"],
        tenant=row["tenant"],
        reply=row["reply"],
        source=row["source"],
        metadata=row["metadata"],
        received_at=row["received_at"],
    )
