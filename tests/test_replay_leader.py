"""A real schedule on two worker processes: one run per tick, also when the leader dies.

The workers get their own database, topics and consumer group, and a
schedule with a seconds field (every two seconds) to keep the test short.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from graphinfer.embedded import drop_database, ensure_database
from graphinfer.replay.examples import mutag_replay_records, write_jsonl
from tests.conftest import Services, start_worker_process

pytestmark = pytest.mark.integration

PERIOD = timedelta(seconds=2)
RECORDS_PER_RUN = 5


@pytest.fixture
async def leader_database(services: Services, session_id: str) -> AsyncIterator[str]:
    name = f"graphinfer_leader_{session_id}"
    url = await ensure_database(services.server_url, name)
    yield url
    await drop_database(services.server_url, name)


def wait_for_log(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert process.poll() is None, path.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"{text!r} not logged in {path}"
        time.sleep(0.1)


async def fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


async def test_two_workers_one_run_per_tick(
    worker_environment: dict[str, str], leader_database: str, session_id: str, tmp_path: Path
) -> None:
    dataset = write_jsonl(tmp_path / "scheduled.jsonl", mutag_replay_records()[:RECORDS_PER_RUN])
    prefix = f"l{session_id}"
    environment = {
        **worker_environment,
        "GRAPHINFER_APP_ID": f"graphinfer-{prefix}",
        "GRAPHINFER_DATABASE_URL": leader_database,
        "GRAPHINFER_REQUEST_TOPIC": f"{prefix}.graph-requests",
        "GRAPHINFER_REPLAY_TOPIC": f"{prefix}.graph-requests.replay",
        "GRAPHINFER_PREDICTION_TOPIC": f"{prefix}.predictions",
        "GRAPHINFER_REPLY_TOPIC": f"{prefix}.graph-replies",
        "GRAPHINFER_DEAD_LETTER_TOPIC": f"{prefix}.graph-requests.dlq",
        "GRAPHINFER_POOL_PROCESSES": "1",
        "GRAPHINFER_KAFKA_SESSION_TIMEOUT_S": "4",
        "GRAPHINFER_REPLAY_SCHEDULE": "*/2 * * * * *",
        "GRAPHINFER_REPLAY_DATASET": str(dataset),
        "GRAPHINFER_REPLAY_STALE_S": "2",
        "GRAPHINFER_REPLAY_MISSED_TICKS": "latest",
    }
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    processes = [start_worker_process(environment, log) for log in logs]
    try:
        for log, process in zip(logs, processes, strict=True):
            wait_for_log(log, "next_tick=", process, timeout=90)

        # 1. Both workers run the schedule for a few ticks; one of them leads.
        await asyncio.sleep(4.5)
        leader = next(
            index
            for index, log in enumerate(logs)
            if "replay leader elected" in log.read_text(errors="replace")
        )
        [killed_at] = await fetch(leader_database, "SELECT now() AS now")
        processes[leader].send_signal(signal.SIGKILL)
        processes[leader].wait(timeout=10)

        # 2. The other worker takes over and keeps the schedule.
        survivor = 1 - leader
        wait_for_log(logs[survivor], "replay leader elected", processes[survivor], timeout=20)
        await asyncio.sleep(4.5)
        [stopped_at] = await fetch(leader_database, "SELECT now() AS now")
        deadline = time.monotonic() + 40
        while True:
            unfinished = await fetch(
                leader_database,
                "SELECT run_id FROM replay_runs WHERE status <> 'finished' AND tick < $1",
                stopped_at["now"],
            )
            if not unfinished or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    runs = await fetch(
        leader_database, "SELECT run_id, tick, status, total, completed FROM replay_runs ORDER BY tick"
    )
    ticks = [run["tick"] for run in runs if run["tick"] < stopped_at["now"]]
    before = [tick for tick in ticks if tick < killed_at["now"]]
    after = [tick for tick in ticks if tick > killed_at["now"]]
    assert len(before) >= 2, runs
    assert len(after) >= 2, runs
    assert len(set(ticks)) == len(ticks), "one run per tick"
    assert all(tick.microsecond == 0 and tick.second % 2 == 0 for tick in ticks)
    gaps = [later - earlier for earlier, later in itertools.pairwise(ticks) if later - earlier != PERIOD]
    missed = re.findall(r"replay ticks missed while no worker led count=(\d+)", logs[survivor].read_text())
    # Ticks due while no worker led are skipped except the latest (GRAPHINFER_REPLAY_MISSED_TICKS=latest).
    assert sum(gap // PERIOD - 1 for gap in gaps) == sum(int(count) - 1 for count in missed), (ticks, missed)
    assert unfinished == [], f"runs left unfinished: {unfinished}"
    for run in runs:
        if run["tick"] < stopped_at["now"]:
            assert run["status"] == "finished", run
            assert run["completed"] == RECORDS_PER_RUN, run
    stored = await fetch(
        leader_database,
        """
        SELECT r.run_id, count(i.request_id) AS n
        FROM replay_runs AS r LEFT JOIN inference_requests AS i ON i.replay_run_id = r.run_id
        WHERE r.tick < $1 GROUP BY r.run_id
        """,
        stopped_at["now"],
    )
    assert all(row["n"] == RECORDS_PER_RUN for row in stored), "each run's records are stored once"
    fired = sum(log.read_text().count("replay tick fired tick=") for log in logs)
    assert fired == len(runs), "no tick was fired by both workers"
