"""The replay publisher against the real PostgreSQL, with a simulated worker.

The simulated worker stores a row for each message it is sent, a little
later, as the real worker does after scoring. That makes the window and
the resume rules visible message by message.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from graphinfer.embedded import drop_database, ensure_database
from graphinfer.replay.examples import mutag_replay_records, write_jsonl
from graphinfer.replay.ids import make_run_id
from graphinfer.replay.publisher import PublishOptions, RunPublisher
from graphinfer.replay.sources import DatasetSpec, iter_jsonl, make_request, summarize_path
from graphinfer.storage.db import Database
from graphinfer.storage.replay import NewRun, ReplayRun, ReplayStore
from tests.conftest import Services


@pytest.fixture(scope="module")
async def own_database(services: Services, session_id: str) -> AsyncIterator[str]:
    # Not the session database: the session worker leads there and would
    # take the pending and stale runs these tests create.
    name = f"graphinfer_replay_publisher_{session_id}"
    url = await ensure_database(services.server_url, name)
    yield url
    await drop_database(services.server_url, name)


@pytest.fixture
async def store(own_database: str) -> AsyncIterator[ReplayStore]:
    database = await Database.connect(own_database, min_size=1, max_size=4)
    yield ReplayStore(database.pool)
    await database.close()


class SimulatedWorker:
    """Stores a row per message sent, ``delay_s`` after the send, and tracks the outstanding maximum."""

    def __init__(self, store: ReplayStore, window: int, delay_s: float = 0.01) -> None:
        self.store = store
        self.window = window
        self.delay_s = delay_s
        self.sent: list[str] = []
        self.max_outstanding = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        document = json.loads(value)
        run_id = dict(headers)["graphinfer-replay-run"].decode()
        stored = await self.store.finished_count(run_id)
        self.sent.append(document["request_id"])
        self.max_outstanding = max(self.max_outstanding, len(set(self.sent)) - stored)
        task = asyncio.create_task(self._store_later(document["request_id"], run_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def _store_later(self, request_id: str, run_id: str) -> None:
        await asyncio.sleep(self.delay_s)
        await store_request(self.store, request_id, run_id)


async def store_request(store: ReplayStore, request_id: str, run_id: str) -> None:
    await store.pool.execute(
        """
        INSERT INTO inference_requests (request_id, request_hash, status, source, replay_run_id, received_at)
        VALUES ($1, 'h', 'ok', 'replay', $2, now()) ON CONFLICT DO NOTHING
        """,
        request_id,
        run_id,
    )


async def new_run(store: ReplayStore, path: Path, *, content_hash: str | None = None) -> ReplayRun:
    spec = DatasetSpec.from_path(path)
    summary = summarize_path(spec)
    content_hash = content_hash or summary.content_hash
    tick = datetime.now(UTC).replace(microsecond=0)
    run = await store.create_running(
        NewRun(make_run_id("manual", tick, content_hash), tick, "manual", spec.stored_form(), content_hash),
        owner="test-publisher",
    )
    assert run is not None
    return run


def options(window: int, stale_s: float = 30.0) -> PublishOptions:
    return PublishOptions(
        topic="replay", window=window, stale_s=stale_s, max_message_bytes=1_000_000, poll_s=0.02
    )


def dataset(tmp_path: Path, count: int) -> Path:
    graphs = mutag_replay_records()
    tag = uuid.uuid4().hex[:8]
    return write_jsonl(
        tmp_path / "graphs.jsonl", [{**graphs[i % 188], "id": f"{tag}-{i}"} for i in range(count)]
    )


async def test_window_bounds_outstanding(store: ReplayStore, tmp_path: Path) -> None:
    run = await new_run(store, dataset(tmp_path, 300))
    worker = SimulatedWorker(store, window=25)
    publisher = RunPublisher(store, worker.send, options(window=25), "test-publisher")

    final = await publisher.execute(run)

    assert final.status == "finished"
    assert final.published == 300
    assert final.completed == 300
    assert len(worker.sent) == 300
    assert len(set(worker.sent)) == 300
    assert 0 < worker.max_outstanding <= 25, f"outstanding reached {worker.max_outstanding}"


async def test_resume_sends_only_unstored(store: ReplayStore, tmp_path: Path) -> None:
    path = dataset(tmp_path, 120)
    run = await new_run(store, path)
    records = list(iter_jsonl(path))
    for record in records[:70]:
        await store_request(store, make_request(record, run.run_id)[0], run.run_id)
    # The earlier publisher sent 80 records before it died; 10 of them are lost.
    await store.pool.execute(
        "UPDATE replay_runs SET published = 80, owner = 'dead', heartbeat_at = now() - interval '1 hour' "
        "WHERE run_id = $1",
        run.run_id,
    )
    resumed = await store.claim(run.run_id, "test-publisher", stale_s=1.0)
    assert resumed is not None
    worker = SimulatedWorker(store, window=50)
    publisher = RunPublisher(store, worker.send, options(window=50, stale_s=0.5), "test-publisher")

    final = await publisher.execute(resumed)

    expected = [make_request(record, run.run_id)[0] for record in records[70:]]
    assert worker.sent == expected, "only the records not stored are sent again"
    assert final.status == "finished"
    assert final.attempts == 2
    assert final.published == 120
    assert await store.finished_count(run.run_id) == 120


async def test_changed_dataset_supersedes_run(store: ReplayStore, tmp_path: Path) -> None:
    path = dataset(tmp_path, 10)
    run = await new_run(store, path, content_hash="0" * 64)
    worker = SimulatedWorker(store, window=50)
    publisher = RunPublisher(store, worker.send, options(window=50), "test-publisher")

    final = await publisher.execute(run)

    old = await store.run(run.run_id)
    assert old is not None
    assert old.status == "superseded"
    assert old.superseded_by == final.run_id
    assert final.run_id != run.run_id
    assert final.dataset_hash == summarize_path(DatasetSpec.from_path(path)).content_hash
    assert final.status == "finished"
    assert final.completed == 10
    assert all(request_id.startswith(final.run_id + ":") for request_id in worker.sent)


async def test_unreadable_dataset_fails_run(store: ReplayStore, tmp_path: Path) -> None:
    path = dataset(tmp_path, 3)
    run = await new_run(store, path)
    path.unlink()
    worker = SimulatedWorker(store, window=10)
    publisher = RunPublisher(store, worker.send, options(window=10), "test-publisher")

    final = await publisher.execute(run)

    assert final.status == "failed"
    assert final.error is not None
    assert "does not exist" in final.error
    assert worker.sent == []
