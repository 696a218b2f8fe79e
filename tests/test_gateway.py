"""The HTTP gateway against the real broker, worker and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from graphinfer.embedded import free_port
from graphinfer.models import datasets
from tests.conftest import ROOT, WorkerProcess
from tests.kafka_client import KafkaTestClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway_url(worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    environment = {
        **worker.environment,
        "GRAPHINFER_GATEWAY_PORT": str(port),
        "GRAPHINFER_GATEWAY_TIMEOUT_S": "20",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "graphinfer", "gateway"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the gateway did not start:\n{Path(log_path).read_text()[-3000:]}")
        time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def mutag_record() -> dict:
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    return test[6]


async def test_predict_matches_kafka_path(
    gateway_url: str, kafka: KafkaTestClient, mutag_record: dict, unique_id: str
) -> None:
    await kafka.publish(datasets.mutag_request(mutag_record, f"{unique_id}-kafka"))
    [kafka_reply] = await kafka.wait_for_replies(f"{unique_id}-kafka")
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        response = await client.post(
            "/v1/predict", json=datasets.mutag_request(mutag_record, f"{unique_id}-http")
        )

    assert response.status_code == 200, response.text
    http_reply = response.json()
    assert http_reply["status"] == "ok"
    assert [item["output"] for item in http_reply["results"]] == [
        item["output"] for item in kafka_reply["results"]
    ]
    rows = await kafka.fetch(
        "SELECT status FROM inference_requests WHERE request_id = $1", f"{unique_id}-http"
    )
    assert [row["status"] for row in rows] == ["ok"]


async def test_predict_without_id_gets_one(gateway_url: str, mutag_record: dict) -> None:
    request = datasets.mutag_request(mutag_record, "unused")
    del request["request_id"]
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        response = await client.post("/v1/predict", json=request)
    assert response.status_code == 200
    assert response.json()["request_id"]


async def test_async_request_then_poll(gateway_url: str, mutag_record: dict, unique_id: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        response = await client.post("/v1/requests", json=datasets.mutag_request(mutag_record, unique_id))
        assert response.status_code == 202
        assert response.headers["location"] == f"/v1/requests/{unique_id}"
        deadline = time.monotonic() + 30
        while True:
            polled = await client.get(response.headers["location"])
            assert polled.status_code == 200
            if polled.json()["status"] != "pending" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert polled.json()["status"] == "ok"


async def test_unknown_request_id_is_404(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        response = await client.get("/v1/requests/nobody-sent-this")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"code", "message", "details"}


async def test_invalid_json_is_400_error_object(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        response = await client.post(
            "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert "detail" not in response.json()


async def test_invalid_graph_is_422_and_not_stored(
    gateway_url: str, kafka: KafkaTestClient, unique_id: str
) -> None:
    request = {
        "request_id": unique_id,
        "graph": {"nodes": [{"id": 1}], "edges": [{"source": 1, "target": 2}]},
    }
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        response = await client.post("/v1/predict", json=request)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_graph"
    assert await kafka.fetch("SELECT 1 FROM inference_requests WHERE request_id = $1", unique_id) == []


async def test_oversized_body_is_413(gateway_url: str) -> None:
    body = json.dumps({"request_id": "big", "graph": {"nodes": [], "pad": "x" * 1_000_001}}).encode()
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        response = await client.post("/v1/predict", content=body)
    assert response.status_code == 413
    assert "GRAPHINFER_MAX_MESSAGE_BYTES" in response.json()["error"]["message"]


async def test_oversized_chunked_body_is_413(gateway_url: str) -> None:
    async def chunks():
        for _ in range(20):
            yield b"x" * 100_000

    async with httpx.AsyncClient(base_url=gateway_url) as client:
        response = await client.post("/v1/requests", content=chunks())
    assert response.status_code == 413


async def test_reused_id_with_other_graph_is_409(
    gateway_url: str, mutag_record: dict, unique_id: str
) -> None:
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        first = await client.post("/v1/predict", json=datasets.mutag_request(mutag_record, unique_id))
        second = await client.post("/v1/predict", json=datasets.mutag_request(test[7], unique_id))
    assert first.status_code == 200
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "request_id_conflict"
