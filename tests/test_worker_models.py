"""A worker with failing models and hot-reloaded versions, through the real topics."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from graphinfer.models.manifest import ARTIFACT_NAME
from tests import fake_models
from tests.conftest import WorkerProcess, launch_worker, private_environment, stop_worker
from tests.kafka_client import KafkaTestClient
from tests.model_factory import graph_request, write_model

pytestmark = pytest.mark.integration

LOAD_REQUESTS = 256


@pytest.fixture(scope="module")
def fault_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("fault-models")
    write_model(repository, "healthy", 1, fake_models.ConstantModel([0.2, 0.8]))
    write_model(repository, "raising", 1, fake_models.RaisingModel())
    write_model(repository, "sleeping", 1, fake_models.SleepingModel(60))
    write_model(repository, "allocating", 1, fake_models.AllocatingModel(3_000))
    write_model(repository, "versioned", 1, fake_models.ConstantModel([0.9, 0.1]))
    return repository


@pytest.fixture(scope="module")
def model_worker(
    worker_environment: dict[str, str], fault_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    environment = private_environment(
        worker_environment,
        f"models{uuid.uuid4().hex[:8]}",
        GRAPHINFER_MODEL_REPOSITORY=str(fault_repository),
        GRAPHINFER_MODEL_TIMEOUT_S="2",
        GRAPHINFER_POOL_MEMORY_LIMIT_MB="1024",
        GRAPHINFER_MODEL_RELOAD_INTERVAL_S="0",
        GRAPHINFER_MODEL_KEEP_PREVIOUS="1",
    )
    started = launch_worker(environment, tmp_path_factory.mktemp("model-worker") / "worker.log")
    yield started
    stop_worker(started)


@pytest.fixture(scope="module")
async def model_kafka(model_worker: WorkerProcess) -> AsyncIterator[KafkaTestClient]:
    client = KafkaTestClient(model_worker.environment)
    await client.start()
    yield client
    await client.stop()


def worker_pid_from_log(worker: WorkerProcess) -> int:
    match = re.search(r"worker started name=\S+:(\d+)", worker.log())
    assert match is not None
    return int(match.group(1))


async def test_failing_models_leave_worker_running(
    model_worker: WorkerProcess, model_kafka: KafkaTestClient
) -> None:
    pid_before = worker_pid_from_log(model_worker)
    ids = [f"faults-{uuid.uuid4().hex[:8]}-{index}" for index in range(4)]
    for request_id in ids:
        await model_kafka.publish(
            graph_request(request_id, models=["healthy", "raising", "sleeping", "allocating"])
        )
    for request_id in ids:
        [reply] = await model_kafka.wait_for_replies(request_id, timeout=90)
        by_model = {result["model"]: result for result in reply["results"]}
        assert reply["status"] == "partial"
        assert by_model["healthy"]["status"] == "ok"
        assert by_model["healthy"]["output"]["label"] == "yes"
        assert by_model["raising"]["error"]["code"] == "model_failed"
        assert by_model["sleeping"]["error"]["code"] == "model_timeout"
        assert by_model["allocating"]["error"]["code"] == "model_out_of_memory"

    assert model_worker.process.poll() is None
    assert model_worker.process.pid == pid_before
    rows = await model_kafka.fetch(
        "SELECT model, status FROM predictions WHERE request_id = ANY($1) ORDER BY model", ids
    )
    assert len(rows) == 4 * len(ids)


async def test_failing_models_under_load_leave_others(
    model_worker: WorkerProcess, model_kafka: KafkaTestClient
) -> None:
    pid_before = worker_pid_from_log(model_worker)
    prefix = f"load-{uuid.uuid4().hex[:8]}"
    ids = [f"{prefix}-{index}" for index in range(LOAD_REQUESTS)]
    await asyncio.gather(
        *(
            model_kafka.publish(
                graph_request(request_id, models=["healthy", "raising", "sleeping", "allocating"])
            )
            for request_id in ids
        )
    )
    codes: Counter[tuple[str, str]] = Counter()
    for request_id in ids:
        [reply] = await model_kafka.wait_for_replies(request_id, timeout=120)
        assert reply["status"] == "partial"
        for result in reply["results"]:
            codes[
                result["model"], result["status"] if result["status"] == "ok" else result["error"]["code"]
            ] += 1

    assert codes == {
        ("healthy", "ok"): LOAD_REQUESTS,
        ("raising", "model_failed"): LOAD_REQUESTS,
        ("sleeping", "model_timeout"): LOAD_REQUESTS,
        ("allocating", "model_out_of_memory"): LOAD_REQUESTS,
    }
    assert model_worker.process.poll() is None
    assert worker_pid_from_log(model_worker) == pid_before
    rows = await model_kafka.fetch(
        "SELECT model, count(*) AS n FROM predictions WHERE request_id = ANY($1) GROUP BY model", ids
    )
    assert {row["model"]: row["n"] for row in rows} == dict.fromkeys(
        ["healthy", "raising", "sleeping", "allocating"], LOAD_REQUESTS
    )
    replaced = len(re.findall(r"replacing (process )?pid=", model_worker.log()))
    print(
        f"\nRELIABILITY failing_models_under_load: sent={LOAD_REQUESTS} replies={len(ids)} "
        f"rows={sum(row['n'] for row in rows)} healthy_ok={codes['healthy', 'ok']} "
        f"processes_replaced_total={replaced} worker_restarts=0"
    )


async def _send_stream(client: KafkaTestClient, prefix: str, count: int, pause_s: float) -> list[str]:
    ids = []
    for index in range(count):
        request_id = f"{prefix}-{index}"
        await client.publish(graph_request(request_id, models=["versioned"]))
        ids.append(request_id)
        await asyncio.sleep(pause_s)
    return ids


async def test_new_version_serves_after_reload(
    model_worker: WorkerProcess, model_kafka: KafkaTestClient, fault_repository: Path
) -> None:
    prefix = f"reload-{uuid.uuid4().hex[:8]}"
    sending = asyncio.create_task(_send_stream(model_kafka, prefix, count=60, pause_s=0.05))
    await asyncio.sleep(0.5)
    write_model(fault_repository, "versioned", 2, fake_models.ConstantModel([0.1, 0.9]))
    os.kill(model_worker.process.pid, signal.SIGHUP)
    ids = await sending

    versions = []
    for request_id in ids:
        [reply] = await model_kafka.wait_for_replies(request_id, timeout=60)
        assert reply["status"] == "ok", reply
        versions.append(reply["results"][0]["version"])
    assert versions[0] == 1
    assert versions[-1] == 2
    assert versions == sorted(versions), "once version 2 serves, version 1 does not come back"

    pinned_id = f"{prefix}-previous"
    request = graph_request(pinned_id, models=["versioned@1"])
    await model_kafka.publish(request)
    [reply] = await model_kafka.wait_for_replies(pinned_id, timeout=30)
    assert reply["results"][0]["version"] == 1
    assert reply["results"][0]["output"]["label"] == "no"


async def test_broken_new_version_keeps_serving(
    model_worker: WorkerProcess, model_kafka: KafkaTestClient, fault_repository: Path
) -> None:
    request_id = f"broken-{uuid.uuid4().hex[:8]}"
    await model_kafka.publish(graph_request(f"{request_id}-before", models=["versioned"]))
    [before] = await model_kafka.wait_for_replies(f"{request_id}-before", timeout=60)

    broken = write_model(fault_repository, "versioned", 9, fake_models.ConstantModel([0.5, 0.5]))
    (broken / ARTIFACT_NAME).write_bytes(b"truncated")
    os.kill(model_worker.process.pid, signal.SIGHUP)
    await asyncio.sleep(2)
    await model_kafka.publish(graph_request(f"{request_id}-after", models=["versioned"]))
    [after] = await model_kafka.wait_for_replies(f"{request_id}-after", timeout=60)

    assert after["status"] == "ok"
    assert after["results"][0]["version"] == before["results"][0]["version"]
    assert re.search(r"model rejected path=\S+/versioned/9", model_worker.log())
    # The refused version is counted even though the served set did not change.
    url = re.search(r"metrics served url=(\S+)", model_worker.log())
    assert url is not None
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(url.group(1))).text
    refused = re.search(r"^graphinfer_worker_models_refused (\S+)$", text, re.MULTILINE)
    assert refused is not None
    assert float(refused.group(1)) >= 1
