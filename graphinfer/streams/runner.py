"""Start a worker: check the broker and database, then run the Faust app."""

from __future__ import annotations

import asyncio
import logging

from graphinfer.broker import ensure_topics
from graphinfer.settings import Settings
from graphinfer.storage.db import Database

logger = logging.getLogger(__name__)


async def preflight(settings: Settings) -> None:
    """Fail fast, naming the setting, when the broker or the database is missing.

    Creates the topics and applies migrations, so the worker starts on a
    ready cluster.
    """
    database = await Database.connect(
        settings.dsn, min_size=0, max_size=1, timeout_s=settings.database_connect_timeout_s
    )
    await database.close()
    counts = await ensure_topics(settings)
    logger.info("topics ready %s", " ".join(f"{topic}={count}" for topic, count in sorted(counts.items())))


def run_worker(settings: Settings) -> None:
    """Run the worker until SIGINT or SIGTERM; in-flight batches finish or stay uncommitted."""
    from faust.worker import Worker

    from graphinfer.streams.app import create_app

    settings.bootstrap_servers  # noqa: B018 - raises ConfigurationError when unset
    settings.dsn  # noqa: B018
    asyncio.run(preflight(settings))
    app = create_app(settings)
    worker = Worker(
        app,
        loglevel=settings.log_level,
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    # The start-up spinner writes terminal control codes, also into log files.
    worker.spinner = None
    worker.execute_from_commandline()
