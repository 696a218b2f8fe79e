"""Replay state in PostgreSQL: the schedule's last tick, the runs, their owners and counts.

Each change of hands is one compare-and-set statement, so two processes
never fire the same tick or publish the same run at once:

- a tick fires when ``replay_schedule.last_tick`` moves forward to it, and
  the run it creates is inserted in the same transaction;
- a run is published by its ``owner``. Another process takes it over only
  when the run is pending, or running with a heartbeat older than the stale
  limit. An owner whose heartbeat update matches no row has lost the run.

A run's progress is counted from the rows the worker stored under its id
(``inference_requests.replay_run_id``) and from ``replay_record_errors``,
never incremented per message, so repeated deliveries cannot inflate it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

#: Statuses of ``replay_runs.status``: ``pending`` waits for the leader,
#: ``running`` has an owner that heartbeats, ``interrupted`` was stopped by
#: hand and waits for ``graphinfer replay --resume``, ``superseded`` found its
#: data set changed and names the run that replaced it.
RUN_STATUSES = ("pending", "running", "interrupted", "finished", "superseded", "failed")
COMPLETED_STATUSES = ("ok", "partial")
FAILED_STATUSES = ("failed", "expired")


@dataclass(frozen=True)
class ReplayRun:
    """One row of ``replay_runs``."""

    run_id: str
    tick: datetime | None
    trigger: str
    dataset: str
    dataset_hash: str
    status: str
    owner: str | None
    attempts: int
    started_at: datetime
    finished_at: datetime | None
    heartbeat_at: datetime
    total: int | None
    published: int
    completed: int
    rejected: int
    failed: int
    error: str | None
    superseded_by: str | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ReplayRun:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class NewRun:
    """A run about to be inserted."""

    run_id: str
    tick: datetime
    trigger: str
    dataset: str
    dataset_hash: str
    total: int | None = None
    status: str = "pending"
    error: str | None = None


@dataclass(frozen=True)
class RunCounts:
    """A run's progress, counted from stored rows.

    ``finished`` counts every stored request of the run, whatever its status.
    ``failed`` counts the requests that every model failed on or that
    expired, plus the unreadable records.
    """

    finished: int
    completed: int
    rejected: int
    failed: int
    unreadable: int

    @property
    def done(self) -> int:
        """Records with an outcome: stored requests plus unreadable records."""
        return self.finished + self.unreadable


@dataclass(frozen=True)
class RecordError:
    """An unreadable record: where it is and why it could not be read."""

    position: int
    location: str
    reason: str


@dataclass(frozen=True)
class ModelOutcome:
    request_id: str
    model: str
    version: int
    output: dict[str, Any]


_RUN_COLUMNS = ", ".join(ReplayRun.__dataclass_fields__)


class ReplayStore:
    """Replay state in PostgreSQL, read and written through an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # --- the schedule ----------------------------------------------------------

    async def last_tick(self, app_id: str) -> datetime | None:
        value: datetime | None = await self.pool.fetchval(
            "SELECT last_tick FROM replay_schedule WHERE app_id = $1", app_id
        )
        return value

    async def start_schedule(self, app_id: str, tick: datetime) -> datetime:
        """Record ``tick`` as the last one fired unless a tick is recorded; return the recorded one."""
        await self.pool.execute(
            "INSERT INTO replay_schedule (app_id, last_tick) VALUES ($1, $2) ON CONFLICT (app_id) DO NOTHING",
            app_id,
            tick,
        )
        recorded = await self.last_tick(app_id)
        assert recorded is not None
        return recorded

    async def claim_tick(self, app_id: str, tick: datetime, run: NewRun | None) -> bool:
        """Move the last tick forward to ``tick`` and insert its run, in one transaction.

        Returns false, changing nothing, when ``tick`` is not later than the
        recorded one: another process fired it already.
        """
        async with self.pool.acquire() as connection, connection.transaction():
            claimed = await connection.fetchval(
                """
                INSERT INTO replay_schedule AS schedule (app_id, last_tick) VALUES ($1, $2)
                ON CONFLICT (app_id) DO UPDATE SET last_tick = EXCLUDED.last_tick, updated_at = now()
                WHERE schedule.last_tick < EXCLUDED.last_tick
                RETURNING true
                """,
                app_id,
                tick,
            )
            if not claimed:
                return False
            if run is not None:
                await connection.execute(
                    """
                    INSERT INTO replay_runs
                        (run_id, tick, trigger, dataset, dataset_hash, status, total, error, finished_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $6 = 'failed' THEN now() END)
                    ON CONFLICT (run_id) DO NOTHING
                    """,
                    run.run_id,
                    run.tick,
                    run.trigger,
                    run.dataset,
                    run.dataset_hash,
                    run.status,
                    run.total,
                    run.error,
                )
            return True

    # --- runs and their owners -------------------------------------------------

    async def run(self, run_id: str) -> ReplayRun | None:
        row = await self.pool.fetchrow(f"SELECT {_RUN_COLUMNS} FROM replay_runs WHERE run_id = $1", run_id)
        return None if row is None else ReplayRun.from_row(row)

    async def runs(self, limit: int = 20) -> list[ReplayRun]:
        """Return the most recent runs, newest first."""
        rows = await self.pool.fetch(
            f"SELECT {_RUN_COLUMNS} FROM replay_runs ORDER BY started_at DESC, run_id DESC LIMIT $1", limit
        )
        return [ReplayRun.from_row(row) for row in rows]

    async def create_running(self, run: NewRun, owner: str) -> ReplayRun | None:
        """Insert a run already owned by ``owner``; return ``None`` when the id exists."""
        row = await self.pool.fetchrow(
            f"""
            INSERT INTO replay_runs
                (run_id, tick, trigger, dataset, dataset_hash, status, owner, attempts, total)
            VALUES ($1, $2, $3, $4, $5, 'running', $6, 1, $7)
            ON CONFLICT (run_id) DO NOTHING
            RETURNING {_RUN_COLUMNS}
            """,
            run.run_id,
            run.tick,
            run.trigger,
            run.dataset,
            run.dataset_hash,
            owner,
            run.total,
        )
        return None if row is None else ReplayRun.from_row(row)

    async def claim_next(self, owner: str, stale_s: float) -> ReplayRun | None:
        """Take the oldest pending run, or a running one whose owner stopped heartbeating."""
        row = await self.pool.fetchrow(
            f"""
            UPDATE replay_runs SET
                status = 'running', owner = $1, attempts = attempts + 1, heartbeat_at = now(),
                started_at = CASE WHEN status = 'pending' THEN now() ELSE started_at END
            WHERE run_id = (
                SELECT run_id FROM replay_runs
                WHERE status = 'pending' OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => $2))
                ORDER BY tick NULLS LAST, started_at
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            ) AND (status = 'pending' OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => $2)))
            RETURNING {_RUN_COLUMNS}
            """,
            owner,
            stale_s,
        )
        return None if row is None else ReplayRun.from_row(row)

    async def claim(self, run_id: str, owner: str, stale_s: float) -> ReplayRun | None:
        """Take one run unless it is finished, superseded, or running with a fresh heartbeat."""
        row = await self.pool.fetchrow(
            f"""
            UPDATE replay_runs SET
                status = 'running', owner = $2, attempts = attempts + 1, heartbeat_at = now(),
                error = NULL, finished_at = NULL
            WHERE run_id = $1 AND (
                status IN ('pending', 'interrupted', 'failed')
                OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => $3))
            )
            RETURNING {_RUN_COLUMNS}
            """,
            run_id,
            owner,
            stale_s,
        )
        return None if row is None else ReplayRun.from_row(row)

    async def heartbeat(self, run_id: str, owner: str, published: int) -> bool:
        """Refresh the owner's heartbeat and published count; false when the run changed hands."""
        result = await self.pool.execute(
            """
            UPDATE replay_runs SET heartbeat_at = now(), published = GREATEST(published, $3)
            WHERE run_id = $1 AND owner = $2 AND status = 'running'
            """,
            run_id,
            owner,
            published,
        )
        return bool(result == "UPDATE 1")

    async def set_total(self, run_id: str, owner: str, total: int) -> None:
        await self.pool.execute(
            "UPDATE replay_runs SET total = $3 WHERE run_id = $1 AND owner = $2", run_id, owner, total
        )

    async def release(self, run_id: str, owner: str) -> None:
        """Give a running run up so that the leader resumes it at once instead of after the stale limit."""
        await self.pool.execute(
            """
            UPDATE replay_runs SET heartbeat_at = '-infinity', owner = NULL
            WHERE run_id = $1 AND owner = $2 AND status = 'running'
            """,
            run_id,
            owner,
        )

    async def interrupt(self, run_id: str, owner: str) -> None:
        """Stop a run by hand; only ``graphinfer replay --resume`` continues it."""
        await self.pool.execute(
            """
            UPDATE replay_runs SET status = 'interrupted', owner = NULL, heartbeat_at = now()
            WHERE run_id = $1 AND owner = $2 AND status = 'running'
            """,
            run_id,
            owner,
        )

    async def fail(self, run_id: str, owner: str, error: str) -> None:
        await self.pool.execute(
            """
            UPDATE replay_runs SET status = 'failed', error = $3, owner = NULL, finished_at = now()
            WHERE run_id = $1 AND owner = $2 AND status = 'running'
            """,
            run_id,
            owner,
            error,
        )

    async def finish(self, run_id: str, owner: str, published: int, counts: RunCounts) -> bool:
        result = await self.pool.execute(
            """
            UPDATE replay_runs SET
                status = 'finished', finished_at = now(), heartbeat_at = now(), owner = NULL,
                total = $3::integer + $7::integer, published = $3, completed = $4, rejected = $5, failed = $6
            WHERE run_id = $1 AND owner = $2 AND status = 'running'
            """,
            run_id,
            owner,
            published,
            counts.completed,
            counts.rejected,
            counts.failed,
            counts.unreadable,
        )
        return bool(result == "UPDATE 1")

    async def supersede(self, old: ReplayRun, new: NewRun, owner: str, stale_s: float) -> ReplayRun | None:
        """Close ``old`` as superseded by ``new`` and take ``new``, in one transaction.

        Returns the new run, or ``None`` when ``old`` is no longer this owner's
        or ``new`` exists already and is not free to take.
        """
        async with self.pool.acquire() as connection, connection.transaction():
            result = await connection.execute(
                """
                UPDATE replay_runs SET status = 'superseded', superseded_by = $3, owner = NULL,
                    finished_at = now()
                WHERE run_id = $1 AND owner = $2 AND status = 'running'
                """,
                old.run_id,
                owner,
                new.run_id,
            )
            if result != "UPDATE 1":
                return None
            row = await connection.fetchrow(
                f"""
                INSERT INTO replay_runs
                    (run_id, tick, trigger, dataset, dataset_hash, status, owner, attempts, total)
                VALUES ($1, $2, $3, $4, $5, 'running', $6, 1, $7)
                ON CONFLICT (run_id) DO NOTHING
                RETURNING {_RUN_COLUMNS}
                """,
                new.run_id,
                new.tick,
                new.trigger,
                new.dataset,
                new.dataset_hash,
                owner,
                new.total,
            )
        if row is not None:
            return ReplayRun.from_row(row)
        return await self.claim(new.run_id, owner, stale_s)

    # --- records and counts ----------------------------------------------------

    async def record_errors(self, run_id: str, errors: Iterable[RecordError]) -> None:
        rows = [(run_id, error.position, error.location, error.reason) for error in errors]
        if rows:
            await self.pool.executemany(
                """
                INSERT INTO replay_record_errors (run_id, position, location, reason)
                VALUES ($1, $2, $3, $4) ON CONFLICT (run_id, position) DO NOTHING
                """,
                rows,
            )

    async def record_error_list(self, run_id: str, limit: int = 20) -> list[RecordError]:
        rows = await self.pool.fetch(
            """
            SELECT position, location, reason FROM replay_record_errors
            WHERE run_id = $1 ORDER BY position LIMIT $2
            """,
            run_id,
            limit,
        )
        return [RecordError(row["position"], row["location"], row["reason"]) for row in rows]

    async def pending_count(self) -> int:
        """Return how many runs wait for the leader (status ``pending``)."""
        return int(await self.pool.fetchval("SELECT count(*) FROM replay_runs WHERE status = 'pending'"))

    async def finished_count(self, run_id: str) -> int:
        """Count the run's stored requests, whatever their status."""
        count: int = await self.pool.fetchval(
            "SELECT count(*) FROM inference_requests WHERE replay_run_id = $1", run_id
        )
        return count

    async def counts(self, run_id: str) -> RunCounts:
        rows = await self.pool.fetch(
            "SELECT status, count(*) AS n FROM inference_requests WHERE replay_run_id = $1 GROUP BY status",
            run_id,
        )
        by_status = {row["status"]: int(row["n"]) for row in rows}
        unreadable = int(
            await self.pool.fetchval("SELECT count(*) FROM replay_record_errors WHERE run_id = $1", run_id)
        )
        return RunCounts(
            finished=sum(by_status.values()),
            completed=sum(by_status.get(status, 0) for status in COMPLETED_STATUSES),
            rejected=by_status.get("rejected", 0),
            failed=sum(by_status.get(status, 0) for status in FAILED_STATUSES) + unreadable,
            unreadable=unreadable,
        )

    async def stored_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        rows = await self.pool.fetch(
            "SELECT request_id FROM inference_requests WHERE request_id = ANY($1::text[])", list(request_ids)
        )
        return {row["request_id"] for row in rows}

    async def outcomes(self, run_id: str) -> list[ModelOutcome]:
        """Return every model result the run's requests got, for accuracy against the data set's labels."""
        rows = await self.pool.fetch(
            """
            SELECT p.request_id, p.model, p.version, p.output
            FROM predictions AS p JOIN inference_requests AS r USING (request_id)
            WHERE r.replay_run_id = $1 AND p.status = 'ok'
            """,
            run_id,
        )
        return [ModelOutcome(row["request_id"], row["model"], row["version"], row["output"]) for row in rows]
