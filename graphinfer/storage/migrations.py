"""Schema migrations, applied in order under a PostgreSQL advisory lock.

Processes that start together (several workers, the gateway, ``graphinfer
migrate``) each call :func:`migrate`; the advisory lock makes them apply the
pending migrations once, one after the other.
"""

from __future__ import annotations

import logging

import asyncpg

logger = logging.getLogger(__name__)

# A fixed key for pg_advisory_lock, shared by every graphinfer process.
MIGRATION_LOCK_KEY = 0x67726166_696E6672 & 0x7FFF_FFFF_FFFF_FFFF

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "initial tables",
        """
        CREATE TABLE inference_requests (
            request_id     text PRIMARY KEY,
            request_hash   text NOT NULL,
            status         text NOT NULL CHECK (status IN
                               ('pending', 'ok', 'partial', 'failed', 'rejected', 'expired')),
            source         text NOT NULL CHECK (source IN ('online', 'replay')),
            replay_run_id  text,
            task           text,
            tenant         text,
            metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
            reply          jsonb,
            error_code     text,
            topic          text,
            kafka_partition integer,
            kafka_offset   bigint,
            traceparent    text,
            received_at    timestamptz NOT NULL,
            completed_at   timestamptz,
            created_at     timestamptz NOT NULL DEFAULT now(),
            updated_at     timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX inference_requests_replay_run_idx
            ON inference_requests (replay_run_id) WHERE replay_run_id IS NOT NULL;
        CREATE INDEX inference_requests_status_idx ON inference_requests (status, received_at);

        CREATE TABLE predictions (
            request_id  text NOT NULL REFERENCES inference_requests (request_id) ON DELETE CASCADE,
            model       text NOT NULL,
            version     integer NOT NULL,
            task        text NOT NULL,
            status      text NOT NULL CHECK (status IN ('ok', 'error')),
            latency_ms  double precision,
            output      jsonb,
            error       jsonb,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (request_id, model)
        );

        CREATE TABLE dead_letters (
            topic           text NOT NULL,
            kafka_partition integer NOT NULL,
            kafka_offset    bigint NOT NULL,
            request_id      text,
            message_key     bytea,
            message_value   bytea,
            code            text NOT NULL,
            reason          text NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (topic, kafka_partition, kafka_offset)
        );

        CREATE TABLE replay_runs (
            run_id        text PRIMARY KEY,
            tick          timestamptz,
            dataset       text NOT NULL,
            dataset_hash  text NOT NULL,
            status        text NOT NULL,
            started_at    timestamptz NOT NULL DEFAULT now(),
            finished_at   timestamptz,
            heartbeat_at  timestamptz NOT NULL DEFAULT now(),
            total         integer,
            published     integer NOT NULL DEFAULT 0,
            completed     integer NOT NULL DEFAULT 0,
            rejected      integer NOT NULL DEFAULT 0,
            failed        integer NOT NULL DEFAULT 0
        );

        CREATE TABLE model_deployments (
            worker      text NOT NULL,
            model       text NOT NULL,
            version     integer NOT NULL,
            sha256      text NOT NULL,
            task        text NOT NULL,
            manifest    jsonb NOT NULL,
            serving     boolean NOT NULL,
            loaded_at   timestamptz NOT NULL,
            heartbeat_at timestamptz NOT NULL,
            PRIMARY KEY (worker, model, version)
        );
        """,
    ),
    (
        2,
        "replay schedule, run ownership and unreadable records",
        """
        ALTER TABLE replay_runs
            ADD COLUMN trigger       text NOT NULL DEFAULT 'schedule' CHECK (trigger IN ('schedule', 'manual')),
            ADD COLUMN owner         text,
            ADD COLUMN attempts      integer NOT NULL DEFAULT 0,
            ADD COLUMN error         text,
            ADD COLUMN superseded_by text,
            ADD CONSTRAINT replay_runs_status_check CHECK (status IN
                ('pending', 'running', 'interrupted', 'finished', 'superseded', 'failed'));
        CREATE INDEX replay_runs_status_idx ON replay_runs (status, tick);

        CREATE TABLE replay_schedule (
            app_id     text PRIMARY KEY,
            last_tick  timestamptz NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE replay_record_errors (
            run_id     text NOT NULL REFERENCES replay_runs (run_id) ON DELETE CASCADE,
            position   bigint NOT NULL,
            location   text NOT NULL,
            reason     text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_id, position)
        );
        """,
    ),
    (
        3,
        "request payloads, retention indexes and dead letters per message",
        """
        ALTER TABLE inference_requests ADD COLUMN payload jsonb;
        CREATE INDEX inference_requests_age_idx ON inference_requests (coalesce(completed_at, received_at));
        CREATE INDEX predictions_created_idx ON predictions (created_at);
        CREATE INDEX dead_letters_created_idx ON dead_letters (created_at);

        -- Offsets start again at 0 when a topic is recreated (and on every
        -- restart of the in-memory embedded broker), so the coordinates alone
        -- can name two different messages; the message's hash tells them apart
        -- while a redelivery of the same message still finds its row.
        ALTER TABLE dead_letters ADD COLUMN message_sha256 text NOT NULL DEFAULT '';
        ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_pkey;
        ALTER TABLE dead_letters ADD PRIMARY KEY (topic, kafka_partition, kafka_offset, message_sha256);
        """,
    ),
)


async def migrate(connection: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; return the versions applied by this call."""
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS graphinfer_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {row["version"] for row in await connection.fetch("SELECT version FROM graphinfer_migrations")}
        applied = []
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            async with connection.transaction():
                await connection.execute(sql)
                await connection.execute(
                    "INSERT INTO graphinfer_migrations (version, name) VALUES ($1, $2)", version, name
                )
            logger.info("migration applied version=%d name=%r", version, name)
            applied.append(version)
        return applied
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
