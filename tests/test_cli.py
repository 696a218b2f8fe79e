"""The graphinfer command: fail-fast start-up, migrations, Ctrl-C clean-up."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from graphinfer.embedded import free_port
from tests.conftest import ROOT, Services

pytestmark = pytest.mark.integration


def run_cli(
    *arguments: str, environment: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("GRAPHINFER_")}
    base.pop("DB_URL", None)
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "graphinfer", *arguments],
        env={**base, **(environment or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_worker_without_broker_setting_fails_fast() -> None:
    result = run_cli(
        "worker", environment={"GRAPHINFER_DATABASE_URL": "postgresql://postgres@127.0.0.1/postgres"}
    )
    assert result.returncode != 0
    assert "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS is not set" in result.stderr


def test_worker_with_unreachable_broker_names_setting() -> None:
    port = free_port()
    started = time.monotonic()
    result = run_cli(
        "worker",
        environment={
            "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
            "GRAPHINFER_DATABASE_URL": "postgresql://postgres@127.0.0.1/postgres",
        },
    )
    assert result.returncode != 0
    assert "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert time.monotonic() - started < 45


def test_worker_with_unreachable_database_names_setting(services: Services) -> None:
    port = free_port()
    result = run_cli(
        "worker",
        environment={
            "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS": services.bootstrap_servers,
            "GRAPHINFER_DATABASE_URL": f"postgresql://postgres:hunter2@127.0.0.1:{port}/postgres",
            "GRAPHINFER_REQUEST_TOPIC": f"cli-{port}.requests",
        },
    )
    assert result.returncode != 0
    assert "GRAPHINFER_DATABASE_URL" in result.stderr
    assert "hunter2" not in result.stderr, "the password never appears in an error"


def test_worker_with_sqlite_url_explains(services: Services) -> None:
    result = run_cli("worker", environment={"DB_URL": "sqlite:///./test.db"})
    assert result.returncode != 0
    assert "DB_URL" in result.stderr
    assert "PostgreSQL" in result.stderr


def test_gateway_without_database_setting_fails_fast(services: Services) -> None:
    result = run_cli(
        "gateway", environment={"GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS": services.bootstrap_servers}
    )
    assert result.returncode != 0
    assert "GRAPHINFER_DATABASE_URL is not set" in result.stderr


async def test_concurrent_migrations_apply_once(services: Services, session_id: str) -> None:
    from graphinfer.embedded import drop_database, ensure_database
    from graphinfer.storage.migrations import MIGRATIONS

    name = f"graphinfer_migrate_{session_id}"
    url = await ensure_database(services.server_url, name)
    try:
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "graphinfer",
                "migrate",
                env={**os.environ, "GRAPHINFER_DATABASE_URL": url, "PYTHONPATH": str(ROOT)},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            for _ in range(3)
        ]
        outputs = [await process.communicate() for process in processes]
        assert [process.returncode for process in processes] == [0, 0, 0], outputs
        connection = await asyncpg.connect(url)
        try:
            rows = await connection.fetch("SELECT version FROM graphinfer_migrations ORDER BY version")
            tables = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        finally:
            await connection.close()
        assert [row["version"] for row in rows] == [version for version, _, _ in MIGRATIONS]
        assert {"inference_requests", "predictions", "replay_runs", "dead_letters", "model_deployments"} <= {
            row["tablename"] for row in tables
        }
    finally:
        await drop_database(services.server_url, name)


def test_worker_embedded_stops_broker_on_ctrl_c(
    services: Services, database_url: str, model_repository: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "worker.log"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GRAPHINFER_")}
    environment.update(
        {
            "GRAPHINFER_DATABASE_URL": database_url,
            "GRAPHINFER_MODEL_REPOSITORY": str(model_repository),
            "GRAPHINFER_POOL_PROCESSES": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "graphinfer", "worker", "--embedded"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 90
        while "worker started" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the embedded worker did not start"
            time.sleep(0.2)
        match = re.search(r"embedded broker started bootstrap=127\.0\.0\.1:(\d+)", log_path.read_text())
        assert match is not None
        port = int(match.group(1))

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log_path.read_text(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    assert "embedded broker stopped" in log_path.read_text()


def test_send_prints_replies(worker, tmp_path: Path) -> None:
    from graphinfer.models import datasets

    record = datasets.load_mutag()[0]
    path = tmp_path / "requests.jsonl"
    lines = [
        json.dumps(datasets.mutag_request(record, f"send-{uuid.uuid4().hex[:8]}-{index}"))
        for index in range(3)
    ]
    path.write_text("\n".join(lines) + "\n")
    result = run_cli("send", str(path), environment=worker.environment, timeout=120)

    assert result.returncode == 0, result.stderr[-2000:]
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(reply["request_id"] for reply in replies) == sorted(
        json.loads(line)["request_id"] for line in lines
    )
    assert {reply["status"] for reply in replies} == {"ok"}


def test_send_names_bad_line(worker, tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"graph": {"nodes": []}}\n{not json\n')
    result = run_cli("send", str(path), environment=worker.environment)
    assert result.returncode != 0
    assert f"{path}:2" in result.stderr


def test_bench_reports_latency(worker) -> None:
    result = run_cli(
        "bench", "--requests", "20", "--window", "4", environment=worker.environment, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "20 sent, 20 answered" in result.stdout
    assert re.search(r"latency ms: p50 [\d.]+", result.stdout)
    assert "CPUs available" in result.stdout


def test_models_list_reads_given_repository(model_repository: Path, tmp_path: Path) -> None:
    result = run_cli("models", "list", "--repository", str(model_repository))
    assert result.returncode == 0, result.stderr
    assert f"models in {model_repository}:" in result.stdout
    assert re.search(r"^ \* mutag-wl@1\s+task=graph", result.stdout, re.MULTILINE)

    missing = run_cli("models", "list", "--repository", str(tmp_path / "none"))
    assert missing.returncode != 0
    assert "(--repository or GRAPHINFER_MODEL_REPOSITORY)" in missing.stderr


def test_help_lists_every_command_on_one_line() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    commands = result.stdout.split("Commands:", 1)[1].strip().splitlines()
    names = [line.split()[0] for line in commands]
    assert names == ["bench", "demo", "gateway", "migrate", "models", "replay", "send", "worker"]
    assert not [line for line in commands if line.rstrip().endswith("...")], "no summary is cut short"
