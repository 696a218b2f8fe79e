"""Compose parity: each graphinfer service of docker-compose.yml, run natively with its environment.

No Docker engine runs here, so the containers themselves are not started.
This test reads docker-compose.yml and runs the command of every graphinfer
service (migrate, the two workers, the gateway) as a local process with that
service's environment. Only what a container network provides is replaced:
the broker and database addresses, the model volume, the listening
addresses and ports (loopback, free ports), and the topic names (a prefix, so
the run has its own topics on the shared test broker).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from graphinfer.embedded import drop_database, ensure_database
from graphinfer.models import datasets
from tests.conftest import ROOT, Services, launch_worker, stop_worker
from tests.gateway_process import start_gateway

pytestmark = pytest.mark.integration

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
GRAPHINFER_SERVICES = ("migrate", "worker-1", "worker-2", "gateway")
TOPIC_SETTINGS = {
    "graph-requests": "GRAPHINFER_REQUEST_TOPIC",
    "graph-requests.replay": "GRAPHINFER_REPLAY_TOPIC",
    "predictions": "GRAPHINFER_PREDICTION_TOPIC",
    "graph-replies": "GRAPHINFER_REPLY_TOPIC",
    "graph-requests.dlq": "GRAPHINFER_DEAD_LETTER_TOPIC",
}


def compose_topics() -> dict[str, int]:
    """The topics and partition counts the kafka-topics service creates."""
    script = "\n".join(COMPOSE["services"]["kafka-topics"]["command"])
    return {name: int(count) for name, count in re.findall(r"([a-z.-]+):(\d+)", script.split("do")[0])}


def native_environment(
    service: str, services: Services, database_url: str, repository: Path, prefix: str
) -> dict[str, str]:
    environment = {str(key): str(value) for key, value in COMPOSE["services"][service]["environment"].items()}
    assert environment["GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert environment["GRAPHINFER_DATABASE_URL"].startswith("postgresql://")
    assert environment["GRAPHINFER_MODEL_REPOSITORY"] == "/models"
    environment.update(
        {
            "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS": services.bootstrap_servers,
            "GRAPHINFER_DATABASE_URL": database_url,
            "GRAPHINFER_MODEL_REPOSITORY": str(repository),
            "GRAPHINFER_APP_ID": prefix,
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
        }
    )
    if "GRAPHINFER_WORKER_METRICS_PORT" in environment:
        environment["GRAPHINFER_WORKER_METRICS_PORT"] = "0"  # two workers on one host
    for setting in ("GRAPHINFER_GATEWAY_HOST", "GRAPHINFER_WORKER_METRICS_HOST"):
        if environment.get(setting) == "0.0.0.0":
            environment[setting] = "127.0.0.1"
    for topic, setting in TOPIC_SETTINGS.items():
        environment[setting] = f"{prefix}.{topic}"
    return environment


def test_compose_file_pins_images_and_bakes_no_secret() -> None:
    services = COMPOSE["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert not services["kafka"]["image"].endswith(":latest")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "postgres-data" in COMPOSE["volumes"]
    assert [services[name]["command"] for name in GRAPHINFER_SERVICES] == [
        ["migrate"],
        ["worker"],
        ["worker"],
        ["gateway"],
    ]
    assert compose_topics() == {
        "graph-requests": 4,
        "graph-requests.replay": 4,
        "predictions": 4,
        "graph-replies": 4,
        "graph-requests.dlq": 1,
    }
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER graphinfer$", dockerfile, flags=re.M)
    assert not re.search(r"PASSWORD|SECRET|API_KEY", dockerfile)


async def test_compose_services_run_natively(
    services: Services, model_repository: Path, tmp_path: Path, session_id: str
) -> None:
    from graphinfer.broker import ensure_topics
    from graphinfer.settings import load_settings

    prefix = f"compose{uuid.uuid4().hex[:8]}"
    database_url = await ensure_database(services.server_url, f"graphinfer_compose_{session_id}")
    environments = {
        name: native_environment(name, services, database_url, model_repository, prefix)
        for name in GRAPHINFER_SERVICES
    }
    workers = []
    gateway = None
    try:
        # kafka-topics: the compose file's one-shot topic creation.
        topics = {f"{prefix}.{name}": count for name, count in compose_topics().items()}
        await ensure_topics(load_settings(kafka_bootstrap_servers=services.bootstrap_servers), topics)

        # migrate: a one-shot command that must succeed.
        migrate = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "graphinfer", *COMPOSE["services"]["migrate"]["command"]],
            env=environments["migrate"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert migrate.returncode == 0, migrate.stderr[-2000:]

        # worker-1, worker-2 and the gateway.
        for name in ("worker-1", "worker-2"):
            workers.append(
                await asyncio.to_thread(launch_worker, environments[name], tmp_path / f"{name}.log")
            )
        gateway = await asyncio.to_thread(start_gateway, environments["gateway"], tmp_path / "gateway.log")

        _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            response = await client.post(
                "/v1/predict", json=datasets.mutag_request(test[0], f"{prefix}-request")
            )
            metrics = await client.get("/metrics")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ok"
        assert metrics.status_code == 200
        for worker in workers:
            assert worker.process.poll() is None
    finally:
        if gateway is not None:
            gateway.stop()
        for worker in workers:
            stop_worker(worker)
        await drop_database(services.server_url, f"graphinfer_compose_{session_id}")
