"""Replay end to end: ``graphinfer replay`` publishes, the session worker scores, PostgreSQL counts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from graphinfer.models import datasets
from graphinfer.replay.coordinator import ReplayCoordinator
from graphinfer.replay.examples import mutag_replay_records, write_jsonl
from graphinfer.replay.sources import DatasetSpec, summarize_path
from graphinfer.settings import Settings
from graphinfer.storage.db import Database
from graphinfer.storage.replay import NewRun, ReplayStore
from tests.conftest import ROOT, WorkerProcess
from tests.kafka_client import KafkaTestClient

pytestmark = pytest.mark.integration

RUN_ID_RE = re.compile(r"replay run (\S+): (\d+) records")


def replay_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "graphinfer", "replay", *arguments]


def run_replay(
    *arguments: str, environment: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        replay_command(*arguments),
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def numbered_mutag(count: int, prefix: str) -> list[dict[str, Any]]:
    """Return ``count`` MUTAG graphs, repeating the 188 under new ids."""
    graphs = mutag_replay_records()
    return [{**graphs[index % len(graphs)], "id": f"{prefix}-{index}"} for index in range(count)]


async def replies_of_run(kafka: KafkaTestClient, run_id: str, count: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        replies = [
            reply
            for replies in list(kafka.replies.values())
            for reply in replies
            if reply["replay_run_id"] == run_id
        ]
        if len({reply["request_id"] for reply in replies}) >= count or time.monotonic() > deadline:
            return replies
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def mutag_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("replay") / "mutag.jsonl.gz", mutag_replay_records())


async def test_mutag_replay_prints_accuracy(
    worker: WorkerProcess, kafka: KafkaTestClient, mutag_file: Path
) -> None:
    result = await asyncio.to_thread(
        run_replay, "--now", "--dataset", str(mutag_file), "--wait", environment=worker.environment
    )

    assert result.returncode == 0, result.stdout + result.stderr
    match = RUN_ID_RE.search(result.stdout)
    assert match is not None, result.stdout
    run_id = match.group(1)
    assert match.group(2) == "188"
    accuracy = re.search(r"accuracy\s+mutag-wl@1\s+(\d\.\d+)\s+\((\d+) of (\d+) labelled", result.stdout)
    assert accuracy is not None, result.stdout
    assert float(accuracy.group(1)) >= 0.85
    assert accuracy.group(3) == "188"
    assert re.search(r"completed\s+188", result.stdout)
    assert "188/188 records" in result.stdout, "progress lines when not on a terminal"

    rows = await kafka.fetch(
        "SELECT source, status, reply FROM inference_requests WHERE replay_run_id = $1", run_id
    )
    assert len(rows) == 188
    assert {row["source"] for row in rows} == {"replay"}
    assert {row["status"] for row in rows} == {"ok"}
    [run] = await kafka.fetch("SELECT * FROM replay_runs WHERE run_id = $1", run_id)
    assert run["status"] == "finished"
    assert run["total"] == 188
    assert run["published"] == 188
    assert run["completed"] == 188
    assert run["failed"] == 0
    replies = await replies_of_run(kafka, run_id, 188)
    assert len({reply["request_id"] for reply in replies}) == 188, "every consumer of predictions sees them"
    assert all(reply["source"] == "replay" for reply in replies)
    assert all(reply["metadata"]["replay_record"] for reply in replies)


async def test_broken_lines_counted_and_named(
    worker: WorkerProcess, kafka: KafkaTestClient, tmp_path: Path
) -> None:
    good = [json.dumps(record) for record in numbered_mutag(4, "broken")]
    path = tmp_path / "broken.jsonl"
    path.write_text(
        "\n".join(
            [
                *good,
                '{"id": "cut", "nodes": [',
                '"just a string"',
                '{"id": "ghost", "nodes": [{"id": "a"}], "edges": [{"source": "a", "target": "ghost"}]}',
            ]
        )
        + "\n"
    )

    result = await asyncio.to_thread(
        run_replay, "--now", "--dataset", str(path), "--wait", environment=worker.environment
    )

    assert result.returncode == 0, result.stdout + result.stderr
    run_id = RUN_ID_RE.search(result.stdout).group(1)  # type: ignore[union-attr]
    assert re.search(r"completed\s+4\b", result.stdout)
    assert re.search(r"rejected\s+1\b", result.stdout), "an invalid graph is rejected by the worker"
    assert re.search(r"failed\s+2\s+\(2 unreadable\)", result.stdout)
    assert re.search(r"broken\.jsonl:5\s+the message is not valid JSON", result.stdout)
    assert re.search(r"broken\.jsonl:6\s+a JSON str, not an object", result.stdout)
    [run] = await kafka.fetch("SELECT * FROM replay_runs WHERE run_id = $1", run_id)
    assert run["status"] == "finished"
    assert run["total"] == 7
    assert run["completed"] == 4
    assert run["rejected"] == 1
    assert run["failed"] == 2
    errors = await kafka.fetch(
        "SELECT location FROM replay_record_errors WHERE run_id = $1 ORDER BY position", run_id
    )
    assert [row["location"] for row in errors] == ["broken.jsonl:5", "broken.jsonl:6"]


async def test_killed_run_resumes_exactly_once(
    worker: WorkerProcess, kafka: KafkaTestClient, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "killed.jsonl", numbered_mutag(1200, "killed"))
    environment = {**worker.environment, "GRAPHINFER_REPLAY_WINDOW": "40", "GRAPHINFER_REPLAY_STALE_S": "1"}
    dataset = DatasetSpec.from_path(path).stored_form()

    # 1. Start a run and kill its publisher once part of it is stored.
    publisher = await asyncio.create_subprocess_exec(
        *replay_command("--now", "--dataset", str(path), "--wait"),
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        run_id = await _wait_for_stored(kafka, dataset, at_least=300, timeout=60)
        publisher.send_signal(signal.SIGKILL)
        await asyncio.wait_for(publisher.wait(), timeout=10)
    finally:
        if publisher.returncode is None:
            publisher.kill()
            await publisher.wait()
    [halfway] = await kafka.fetch("SELECT status FROM replay_runs WHERE run_id = $1", run_id)
    stored_at_kill = await _stored(kafka, run_id)
    assert halfway["status"] == "running"
    assert stored_at_kill < 1200, "the publisher was killed before the end"

    # 2. Resume it by hand once its heartbeat is stale.
    deadline = time.monotonic() + 20
    while True:
        result = await asyncio.to_thread(run_replay, "--resume", run_id, "--wait", environment=environment)
        if result.returncode == 0 or "being published" not in result.stderr or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"replay run {run_id} finished" in result.stdout
    [run] = await kafka.fetch("SELECT * FROM replay_runs WHERE run_id = $1", run_id)
    assert run["status"] == "finished"
    assert run["attempts"] == 2
    assert run["total"] == 1200
    assert run["published"] == 1200
    assert run["completed"] == 1200
    requests = await kafka.fetch(
        "SELECT count(*) AS n, count(DISTINCT request_id) AS ids FROM inference_requests WHERE replay_run_id = $1",
        run_id,
    )
    assert requests[0]["n"] == 1200, "each record is stored once"
    assert requests[0]["ids"] == 1200
    predictions = await kafka.fetch(
        "SELECT count(*) AS n FROM predictions p JOIN inference_requests r USING (request_id) "
        "WHERE r.replay_run_id = $1",
        run_id,
    )
    assert predictions[0]["n"] == 1200
    replies = await replies_of_run(kafka, run_id, 1200)
    by_id: dict[str, list[dict]] = {}
    for reply in replies:
        by_id.setdefault(reply["request_id"], []).append(reply)
    assert len(by_id) == 1200
    recomputed = [
        request_id for request_id, copies in by_id.items() if any(copy != copies[0] for copy in copies)
    ]
    assert recomputed == [], "a record sent twice is answered from its stored reply, not scored again"


async def _wait_for_stored(kafka: KafkaTestClient, dataset: str, *, at_least: int, timeout: float) -> str:
    """Return the run id of ``dataset`` once at least ``at_least`` of its records are stored."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = await kafka.fetch("SELECT run_id FROM replay_runs WHERE dataset = $1", dataset)
        if rows:
            if await _stored(kafka, rows[0]["run_id"]) >= at_least:
                return str(rows[0]["run_id"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} records of {dataset} were stored within {timeout} s")


async def _stored(kafka: KafkaTestClient, run_id: str) -> int:
    rows = await kafka.fetch("SELECT count(*) AS n FROM inference_requests WHERE replay_run_id = $1", run_id)
    return int(rows[0]["n"])


async def test_leader_resumes_run_of_dead_publisher(
    worker: WorkerProcess, kafka: KafkaTestClient, tmp_path: Path, session_id: str
) -> None:
    path = write_jsonl(tmp_path / "orphan.jsonl", numbered_mutag(60, "orphan"))
    spec = DatasetSpec.from_path(path)
    summary = summarize_path(spec)
    environment = worker.environment
    settings = Settings(
        app_id=f"graphinfer-leader-{session_id}",
        kafka_bootstrap_servers=environment["GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS"],
        database_url=environment["GRAPHINFER_DATABASE_URL"],
        replay_topic=environment["GRAPHINFER_REPLAY_TOPIC"],
        replay_stale_s=1.0,
    )
    database = await Database.connect(settings.dsn, min_size=1, max_size=4)
    store = ReplayStore(database.pool)
    tick = datetime.now(UTC).replace(microsecond=0)
    run_id = f"manual-{tick:%Y%m%dT%H%M%S}Z-{summary.content_hash[:16]}"
    coordinator_task: asyncio.Task[None] | None = None
    try:
        # A run whose publisher died ten seconds ago: stale for this leader
        # (1 s), still fresh for the session worker (60 s).
        await store.create_running(
            NewRun(run_id, tick, "manual", spec.stored_form(), summary.content_hash, summary.total),
            owner="worker-that-died",
        )
        await database.pool.execute(
            "UPDATE replay_runs SET heartbeat_at = now() - interval '10 seconds' WHERE run_id = $1", run_id
        )
        coordinator = ReplayCoordinator(settings, store, owner="replacement-leader")
        coordinator_task = asyncio.create_task(coordinator.run())

        deadline = time.monotonic() + 60
        while (run := await store.run(run_id)) is not None and run.status != "finished":
            assert time.monotonic() < deadline, f"the run was not resumed: {run}"
            await asyncio.sleep(0.2)
    finally:
        if coordinator_task is not None:
            coordinator_task.cancel()
            await asyncio.gather(coordinator_task, return_exceptions=True)
        await database.close()

    assert run is not None
    assert run.attempts == 2
    assert run.total == 60
    assert run.completed == 60
    assert run.heartbeat_at > datetime.now(UTC) - timedelta(minutes=1)


# --- the command without services ----------------------------------------------------


def bare_environment(**settings: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GRAPHINFER_")}
    environment.pop("DB_URL", None)
    environment.pop("OFFLINE_TASK_SCHEDULE", None)
    return {**environment, "PYTHONPATH": str(ROOT), **settings}


def test_replay_without_broker_names_setting(mutag_file: Path) -> None:
    result = run_replay(
        "--now",
        "--dataset",
        str(mutag_file),
        environment=bare_environment(GRAPHINFER_DATABASE_URL="postgresql://postgres@127.0.0.1/postgres"),
    )
    assert result.returncode != 0
    assert "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS is not set" in result.stderr


def test_replay_list_without_database_names_setting() -> None:
    result = run_replay("--list", environment=bare_environment())
    assert result.returncode != 0
    assert "GRAPHINFER_DATABASE_URL is not set" in result.stderr


def test_replay_now_without_dataset_names_settings(worker: WorkerProcess) -> None:
    result = run_replay("--now", environment=worker.environment)
    assert result.returncode != 0
    assert "GRAPHINFER_REPLAY_DATASET" in result.stderr
    assert "--dataset PATH" in result.stderr


def test_replay_needs_one_action() -> None:
    result = run_replay("--wait", environment=bare_environment())
    assert result.returncode == 2
    assert "pass exactly one of --now, --resume RUN_ID and --list" in result.stderr


def test_resume_unknown_run_explained(worker: WorkerProcess) -> None:
    result = run_replay("--resume", "manual-nothing", environment=worker.environment)
    assert result.returncode != 0
    assert "no replay run 'manual-nothing'" in result.stderr


def test_replay_list_shows_runs(worker: WorkerProcess, mutag_file: Path) -> None:
    result = run_replay("--list", environment=worker.environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("run id")
    assert re.search(r"manual-\S+\s+manual\s+\S+ \S+\s+finished\s+188\s+188", result.stdout)


# --- isolation -------------------------------------------------------------------------


async def online_latencies(
    kafka: KafkaTestClient, graphs: list[dict[str, Any]], *, count: int, rate: float, tag: str
) -> list[float]:
    """Send ``count`` MUTAG requests open loop at ``rate`` per second; return each latency in ms."""
    latencies: list[float] = []
    started = time.perf_counter()

    async def one(index: int) -> None:
        request_id = f"{tag}-{index}-{os.urandom(4).hex()}"
        sent = time.perf_counter()
        await kafka.publish(datasets.mutag_request(graphs[index % len(graphs)], request_id))
        await kafka.wait_for_replies(request_id)
        latencies.append((time.perf_counter() - sent) * 1000)

    tasks = []
    for index in range(count):
        await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    return latencies


async def test_online_latency_during_replay(
    worker: WorkerProcess, kafka: KafkaTestClient, tmp_path: Path
) -> None:
    _, graphs = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    path = write_jsonl(tmp_path / "backlog.jsonl", numbered_mutag(3000, "backlog"))
    environment = {**worker.environment, "GRAPHINFER_REPLAY_WINDOW": "100"}
    idle: list[float] = []
    during: list[float] = []

    await online_latencies(kafka, graphs, count=20, rate=20, tag="warm-up")
    replay = await asyncio.create_subprocess_exec(
        *replay_command("--now", "--dataset", str(path)),
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        run_id = await _wait_for_stored(
            kafka, DatasetSpec.from_path(path).stored_form(), at_least=100, timeout=60
        )
        # Idle and replay phases alternate, so other load on the machine
        # falls on both. Idle: the publisher is paused and its records stored.
        for cycle in range(2):
            replay.send_signal(signal.SIGSTOP)
            await _wait_for_drain(kafka, run_id, timeout=30)
            idle += await online_latencies(kafka, graphs, count=60, rate=25, tag=f"idle-{cycle}")
            replay.send_signal(signal.SIGCONT)
            await _wait_for_stored_more(kafka, run_id, more=50, timeout=30)
            during += await online_latencies(kafka, graphs, count=60, rate=25, tag=f"during-{cycle}")
        stored_after = await _stored(kafka, run_id)
    finally:
        replay.send_signal(signal.SIGCONT)
        replay.send_signal(signal.SIGTERM)
        await asyncio.wait_for(replay.wait(), timeout=30)

    idle_p95, during_p95 = float(np.percentile(idle, 95)), float(np.percentile(during, 95))
    idle_p99, during_p99 = float(np.percentile(idle, 99)), float(np.percentile(during, 99))
    assert stored_after < 3000, "the replay was still running when the online requests ended"
    assert during_p95 <= 3 * idle_p95, (
        f"online p95 {during_p95:.0f} ms during the replay, {idle_p95:.0f} ms idle"
    )
    # The p99 of 120 requests is about their second slowest, and single
    # requests of 60 to 120 ms turn up in idle phases too on this machine, so
    # the p99 bar starts at 50 ms. Without the online-first gate an earlier
    # measurement gave a p99 of 557 ms during a replay (benchmarks/README.md);
    # benchmarks/replay_isolation.py measures the ratio over more requests.
    assert during_p99 <= 3 * max(idle_p99, 50.0), (
        f"online p99 {during_p99:.0f} ms during the replay, {idle_p99:.0f} ms idle"
    )


async def _wait_for_stored_more(kafka: KafkaTestClient, run_id: str, *, more: int, timeout: float) -> None:
    target = await _stored(kafka, run_id) + more
    deadline = time.monotonic() + timeout
    while await _stored(kafka, run_id) < target:
        assert time.monotonic() < deadline, f"replay run {run_id} stored fewer than {more} more records"
        await asyncio.sleep(0.1)


async def _wait_for_drain(kafka: KafkaTestClient, run_id: str, timeout: float) -> None:
    """Wait until the stored count of a paused run stays still for half a second."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        stored = await _stored(kafka, run_id)
        if stored == last:
            return
        last = stored
        await asyncio.sleep(0.5)
    raise AssertionError(f"replay run {run_id} was still storing records after {timeout} s")
