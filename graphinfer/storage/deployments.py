"""Model versions of live workers, read from ``model_deployments``.

Each worker replaces its rows at start and refreshes their ``heartbeat_at``
every :data:`HEARTBEAT_INTERVAL_S`. A worker whose heartbeat is older than
:data:`LIVE_WINDOW_S` counts as gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphinfer.storage.db import Database

HEARTBEAT_INTERVAL_S = 15.0
# Four missed heartbeats: long enough to ride out a slow database.
LIVE_WINDOW_S = 4 * HEARTBEAT_INTERVAL_S


@dataclass(frozen=True)
class Deployment:
    """One model version loaded by at least one live worker."""

    model: str
    version: int
    task: str
    sha256: str
    serving: bool
    workers: int
    manifest: dict[str, Any]


async def live_deployments(database: Database, window_s: float = LIVE_WINDOW_S) -> list[Deployment]:
    """Return the model versions loaded by workers whose heartbeat is recent, one row per version."""
    rows = await database.pool.fetch(
        """
        SELECT model, version,
               (array_agg(task ORDER BY heartbeat_at DESC))[1] AS task,
               (array_agg(sha256 ORDER BY heartbeat_at DESC))[1] AS sha256,
               (array_agg(manifest ORDER BY heartbeat_at DESC))[1] AS manifest,
               bool_or(serving) AS serving,
               count(DISTINCT worker) AS workers
        FROM model_deployments
        WHERE heartbeat_at > now() - make_interval(secs => $1)
        GROUP BY model, version
        ORDER BY model, version
        """,
        window_s,
    )
    return [
        Deployment(
            model=row["model"],
            version=row["version"],
            task=row["task"],
            sha256=row["sha256"],
            serving=row["serving"],
            workers=row["workers"],
            manifest=row["manifest"],
        )
        for row in rows
    ]
