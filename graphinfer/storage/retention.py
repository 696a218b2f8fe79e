"""Data retention: delete requests, predictions and dead letters past their periods.

Graph payloads can hold personal data (account graphs in risk scoring), so
every stored kind of row has a retention period; a period of 0 days keeps
rows forever. Deletes run in chunks so a large backlog never holds long
locks on the tables the workers write to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

logger = logging.getLogger(__name__)

_CHUNK = 5_000
# A fixed pg_advisory_xact_lock key, so one worker at a time runs the clean-up.
RETENTION_LOCK_KEY = 0x67726166_72657465 & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class RetentionPeriods:
    """Days each kind of row is kept; 0 keeps it forever."""

    requests_days: int
    predictions_days: int
    dead_letters_days: int


async def purge(connection: asyncpg.Connection, periods: RetentionPeriods) -> dict[str, int]:
    """Delete rows older than their periods; return how many of each kind went."""
    deleted = {"predictions": 0, "inference_requests": 0, "dead_letters": 0}
    if periods.predictions_days > 0:
        deleted["predictions"] = await _delete_chunks(
            connection,
            """
            DELETE FROM predictions WHERE ctid IN (
                SELECT ctid FROM predictions WHERE created_at < now() - make_interval(days => $1) LIMIT $2
            )
            """,
            periods.predictions_days,
        )
    if periods.requests_days > 0:
        # A request row goes with its predictions (ON DELETE CASCADE). Age is
        # counted from completion, or from arrival for a request never answered.
        deleted["inference_requests"] = await _delete_chunks(
            connection,
            """
            DELETE FROM inference_requests WHERE request_id IN (
                SELECT request_id FROM inference_requests
                WHERE coalesce(completed_at, received_at) < now() - make_interval(days => $1) LIMIT $2
            )
            """,
            periods.requests_days,
        )
    if periods.dead_letters_days > 0:
        deleted["dead_letters"] = await _delete_chunks(
            connection,
            """
            DELETE FROM dead_letters WHERE ctid IN (
                SELECT ctid FROM dead_letters WHERE created_at < now() - make_interval(days => $1) LIMIT $2
            )
            """,
            periods.dead_letters_days,
        )
    if any(deleted.values()):
        logger.info(
            "retention clean-up predictions=%d inference_requests=%d dead_letters=%d",
            deleted["predictions"],
            deleted["inference_requests"],
            deleted["dead_letters"],
        )
    return deleted


async def _delete_chunks(connection: asyncpg.Connection, statement: str, days: int) -> int:
    total = 0
    while True:
        status = await connection.execute(statement, days, _CHUNK)
        count = int(status.split()[-1])
        total += count
        if count < _CHUNK:
            return total
