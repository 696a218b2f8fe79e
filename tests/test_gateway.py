"""The HTTP gateway against the real broker, worker and PostgreSQL: one replica with API keys."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from graphinfer.models import datasets
from tests.conftest import WorkerProcess
from tests.gateway_process import GatewayProcess, start_gateway
from tests.kafka_client import KafkaTestClient

pytestmark = pytest.mark.integration

KEY_A = "key-a-0123456789"
KEY_B = "key-b-9876543210"
MAX_NODES = 200


@pytest.fixture(scope="module")
def gateway(worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    environment = {
        **worker.environment,
        "GRAPHINFER_GATEWAY_TIMEOUT_S": "20",
        "GRAPHINFER_API_KEYS": f"tenant-a={KEY_A},tenant-b={KEY_B}",
        "GRAPHINFER_MAX_NODES": str(MAX_NODES),
    }
    process = start_gateway(environment, tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield process
    process.stop()


@pytest.fixture
async def client(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {KEY_A}"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=headers) as client:
        yield client


@pytest.fixture
async def client_b(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {KEY_B}"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=headers) as client:
        yield client


@pytest.fixture(scope="module")
def mutag_records() -> list[dict]:
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    return test


@pytest.fixture(scope="module")
def mutag_record(mutag_records: list[dict]) -> dict:
    return mutag_records[6]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert "detail" not in body
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    return body


async def test_predict_matches_kafka_path(
    client: httpx.AsyncClient, kafka: KafkaTestClient, mutag_record: dict, unique_id: str
) -> None:
    await kafka.publish(datasets.mutag_request(mutag_record, f"{unique_id}-kafka"))
    [kafka_reply] = await kafka.wait_for_replies(f"{unique_id}-kafka")
    response = await client.post(
        "/v1/predict", json=datasets.mutag_request(mutag_record, f"{unique_id}-http")
    )

    assert response.status_code == 200, response.text
    http_reply = response.json()
    assert http_reply["status"] == "ok"
    assert http_reply["request_id"] == f"{unique_id}-http"
    assert [item["output"] for item in http_reply["results"]] == [
        item["output"] for item in kafka_reply["results"]
    ]
    [kafka_copy] = await kafka.wait_for_replies(f"{unique_id}-http")
    assert kafka_copy == http_reply, "the HTTP answer is the reply the worker put on predictions"
    rows = await kafka.fetch(
        "SELECT status, tenant, source FROM inference_requests WHERE request_id = $1", f"{unique_id}-http"
    )
    assert [(row["status"], row["tenant"], row["source"]) for row in rows] == [("ok", "tenant-a", "online")]
    predictions = await kafka.fetch(
        "SELECT model FROM predictions WHERE request_id = $1", f"{unique_id}-http"
    )
    assert [row["model"] for row in predictions] == ["mutag-wl"]


async def test_predict_without_id_gets_one(client: httpx.AsyncClient, mutag_record: dict) -> None:
    request = datasets.mutag_request(mutag_record, "unused")
    del request["request_id"]
    response = await client.post("/v1/predict", json=request)
    assert response.status_code == 200, response.text
    assert response.json()["request_id"]
    assert response.json()["status"] == "ok"


async def test_async_request_then_poll(client: httpx.AsyncClient, mutag_record: dict, unique_id: str) -> None:
    response = await client.post("/v1/requests", json=datasets.mutag_request(mutag_record, unique_id))
    assert response.status_code == 202
    assert response.headers["location"] == f"/v1/requests/{unique_id}"
    assert response.json()["request_id"] == unique_id

    polled = None
    for _ in range(600):
        polled = await client.get(response.headers["location"])
        assert polled.status_code == 200
        assert polled.json()["status"] in ("pending", "ok")
        if polled.json()["status"] == "ok":
            break
        await asyncio.sleep(0.05)
    assert polled is not None
    assert polled.json()["status"] == "ok"
    assert polled.json()["results"][0]["model"] == "mutag-wl"


async def test_retry_returns_stored_reply(
    client: httpx.AsyncClient, kafka: KafkaTestClient, mutag_record: dict, unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_record, unique_id)
    first = await client.post("/v1/predict", json=request)
    second = await client.post("/v1/predict", json=request)
    assert first.status_code == 200
    assert second.status_code == 200
    assert second.json() == first.json()
    rows = await kafka.fetch("SELECT count(*) AS n FROM inference_requests WHERE request_id = $1", unique_id)
    assert rows[0]["n"] == 1


async def test_reused_id_with_other_graph_is_409(
    client: httpx.AsyncClient, mutag_records: list[dict], unique_id: str
) -> None:
    first = await client.post("/v1/predict", json=datasets.mutag_request(mutag_records[6], unique_id))
    second = await client.post("/v1/predict", json=datasets.mutag_request(mutag_records[7], unique_id))
    assert first.status_code == 200
    assert_error(second, 409, "request_id_conflict")


async def test_other_tenant_sees_404_and_409(
    client: httpx.AsyncClient, client_b: httpx.AsyncClient, mutag_record: dict, unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_record, unique_id)
    mine = await client.post("/v1/predict", json=request)
    assert mine.status_code == 200

    assert (await client.get(f"/v1/requests/{unique_id}")).status_code == 200
    assert_error(await client_b.get(f"/v1/requests/{unique_id}"), 404, "not_found")
    assert_error(await client_b.post("/v1/predict", json=request), 409, "request_id_conflict")


async def test_missing_or_wrong_key_is_401(gateway: GatewayProcess, mutag_record: dict) -> None:
    request = datasets.mutag_request(mutag_record, "never-stored")
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        missing = await anonymous.post("/v1/predict", json=request)
        wrong = await anonymous.post("/v1/predict", json=request, headers={"Authorization": "Bearer nope"})
        basic = await anonymous.get("/v1/models", headers={"Authorization": f"Basic {KEY_A}"})
        lookup = await anonymous.get("/v1/requests/never-stored")
        health = await anonymous.get("/healthz")
        ready = await anonymous.get("/readyz")
        metrics = await anonymous.get("/metrics")

    for response in (missing, wrong, basic, lookup):
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    assert KEY_A not in basic.text
    assert health.status_code == 200
    assert ready.status_code == 200
    assert metrics.status_code == 200


async def test_unknown_request_id_is_404(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/requests/nobody-sent-this"), 404, "not_found")


async def test_invalid_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


async def test_invalid_graph_is_422_and_not_stored(
    client: httpx.AsyncClient, kafka: KafkaTestClient, unique_id: str
) -> None:
    request = {
        "request_id": unique_id,
        "graph": {"nodes": [{"id": 1}], "edges": [{"source": 1, "target": 2}]},
    }
    assert_error(await client.post("/v1/predict", json=request), 422, "invalid_graph")
    assert await kafka.fetch("SELECT 1 FROM inference_requests WHERE request_id = $1", unique_id) == []


async def test_graph_over_node_cap_is_422(
    client: httpx.AsyncClient, kafka: KafkaTestClient, unique_id: str
) -> None:
    nodes = [{"id": index, "label": "C"} for index in range(MAX_NODES + 1)]
    request = {"request_id": unique_id, "graph": {"nodes": nodes, "edges": []}, "task": "graph"}
    body = assert_error(await client.post("/v1/predict", json=request), 422, "graph_too_large")
    assert "GRAPHINFER_MAX_NODES" in body["error"]["message"]
    assert body["error"]["details"][0] == {"field": "graph.nodes", "value": MAX_NODES + 1, "limit": MAX_NODES}
    assert await kafka.fetch("SELECT 1 FROM inference_requests WHERE request_id = $1", unique_id) == []


@pytest.mark.parametrize("model", ["no-such-model", "mutag-wl@99"])
async def test_unknown_model_is_422_before_publishing(
    client: httpx.AsyncClient, kafka: KafkaTestClient, mutag_record: dict, unique_id: str, model: str
) -> None:
    request = {**datasets.mutag_request(mutag_record, unique_id), "models": ["mutag-wl", model]}
    body = assert_error(await client.post("/v1/predict", json=request), 422, "unknown_model")
    assert body["request_id"] == unique_id
    assert body["error"]["details"][0]["field"] == "models[1]"
    assert body["error"]["details"][0]["value"] == model
    assert "mutag-wl@1" in body["error"]["details"][0]["limit"]
    assert await kafka.fetch("SELECT 1 FROM inference_requests WHERE request_id = $1", unique_id) == []


async def test_unknown_task_is_422(client: httpx.AsyncClient, mutag_record: dict, unique_id: str) -> None:
    request = {**datasets.mutag_request(mutag_record, unique_id), "task": "community"}
    body = assert_error(await client.post("/v1/requests", json=request), 422, "unknown_task")
    assert body["request_id"] == unique_id
    assert body["error"]["details"][0]["field"] == "task"


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    body = json.dumps({"request_id": "big", "graph": {"nodes": [], "pad": "x" * 1_000_001}}).encode()
    response = await client.post("/v1/predict", content=body)
    error = assert_error(response, 413, "message_too_large")
    assert "GRAPHINFER_MAX_MESSAGE_BYTES" in error["error"]["message"]


async def test_oversized_chunked_body_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 100_000

    response = await client.post("/v1/requests", content=chunks())
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "message_too_large")


async def test_timeout_over_cap_is_422(client: httpx.AsyncClient, mutag_record: dict) -> None:
    request = datasets.mutag_request(mutag_record, "never-stored-timeout")
    over = await client.post("/v1/predict", params={"timeout_s": 100_000}, json=request)
    body = assert_error(over, 422, "invalid_request")
    assert "GRAPHINFER_GATEWAY_MAX_TIMEOUT_S" in body["error"]["message"]
    negative = await client.post("/v1/predict", params={"timeout_s": -1}, json=request)
    body = assert_error(negative, 422, "invalid_request")
    assert body["error"]["details"][0]["field"] == "query.timeout_s"


async def test_unknown_route_is_404_error_object(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(await client.delete("/v1/predict"), 405, "invalid_request")


async def test_models_lists_live_deployments(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    models = {(item["model"], item["version"]): item for item in response.json()["models"]}
    mutag = models[("mutag-wl", 1)]
    assert mutag["task"] == "graph"
    assert mutag["serving"] is True
    assert mutag["workers"] >= 1
    assert mutag["input"]["node_attributes"] == ["label"]
    assert mutag["features"]["name"]
    assert 0.5 < mutag["metrics"]["cv_accuracy"]["value"] <= 1.0
    assert models[("cora-sgc", 1)]["task"] == "node"


async def test_stale_deployment_is_not_served(
    client: httpx.AsyncClient, kafka: KafkaTestClient, mutag_record: dict, unique_id: str
) -> None:
    # A worker that stopped heartbeating minutes ago no longer counts.
    [row] = await kafka.fetch("SELECT manifest FROM model_deployments WHERE model = 'mutag-wl' LIMIT 1")
    await kafka.fetch(
        """
        INSERT INTO model_deployments
            (worker, model, version, sha256, task, manifest, serving, loaded_at, heartbeat_at)
        VALUES ('gone@host:1', 'retired-model', 1, repeat('0', 64), 'graph', $1, true,
                now() - interval '1 hour', now() - interval '10 minutes')
        """,
        row["manifest"],
    )
    models = (await client.get("/v1/models")).json()["models"]
    assert "retired-model" not in {item["model"] for item in models}

    request = {**datasets.mutag_request(mutag_record, unique_id), "models": ["retired-model"]}
    assert_error(await client.post("/v1/predict", json=request), 422, "unknown_model")


async def test_openapi_uses_v1_schemas(gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        schema = (await anonymous.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    assert {"PredictRequest", "PredictReply", "ErrorReply", "GraphPayload"} <= set(components)
    predict = schema["paths"]["/v1/predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictRequest")
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PredictReply"
    )
    assert set(schema["paths"]) >= {"/v1/predict", "/v1/requests", "/v1/requests/{request_id}", "/v1/models"}


async def test_readyz_and_metrics(
    gateway: GatewayProcess, client: httpx.AsyncClient, mutag_record: dict
) -> None:
    await client.post("/v1/predict", json=datasets.mutag_request(mutag_record, "metrics-probe"))
    ready = (await client.get("/readyz")).json()
    assert ready["status"] == "ready"
    assert ready["reply_partition"] in range(4)

    assert await gateway.metric_async("graphinfer_gateway_reply_partition") == ready["reply_partition"]
    assert await gateway.metric_async("graphinfer_gateway_ready") == 1
    assert await gateway.metric_async("graphinfer_gateway_replies_total", outcome="matched") >= 1
    assert await gateway.metric_async("graphinfer_gateway_replies_total", outcome="foreign") == 0
    assert await gateway.metric_async("graphinfer_gateway_pending_replies") == 0
    assert (
        await gateway.metric_async(
            "graphinfer_gateway_http_requests_total", route="/v1/predict", method="POST", status="200"
        )
        >= 1
    )


async def test_duplicate_and_foreign_replies_ignored(
    gateway: GatewayProcess, client: httpx.AsyncClient, mutag_record: dict, unique_id: str
) -> None:
    # Runs last in this module: it puts a foreign reply on the replica's partition on purpose.
    response = await client.post("/v1/predict", json=datasets.mutag_request(mutag_record, unique_id))
    assert response.status_code == 200
    partition = (await client.get("/readyz")).json()["reply_partition"]
    duplicates = await gateway.metric_async("graphinfer_gateway_replies_total", outcome="duplicate")
    foreign = await gateway.metric_async("graphinfer_gateway_replies_total", outcome="foreign")

    producer = AIOKafkaProducer(bootstrap_servers=gateway.environment["GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS"])
    await producer.start()
    try:
        topic = gateway.environment["GRAPHINFER_REPLY_TOPIC"]
        await producer.send_and_wait(topic, response.content, key=unique_id.encode(), partition=partition)
        await producer.send_and_wait(topic, b"{}", key=b"sent-by-nobody-here", partition=partition)
    finally:
        await producer.stop()

    for _ in range(200):
        if await gateway.metric_async("graphinfer_gateway_replies_total", outcome="foreign") > foreign:
            break
        await asyncio.sleep(0.05)
    assert (
        await gateway.metric_async("graphinfer_gateway_replies_total", outcome="duplicate") == duplicates + 1
    )
    assert await gateway.metric_async("graphinfer_gateway_replies_total", outcome="foreign") == foreign + 1
    assert await gateway.metric_async("graphinfer_gateway_pending_replies") == 0
    assert (await client.get(f"/v1/requests/{unique_id}")).json() == response.json()


async def test_traceparent_travels_and_is_stored(
    client: httpx.AsyncClient, kafka: KafkaTestClient, mutag_record: dict, unique_id: str
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = await client.post(
        "/v1/predict",
        json=datasets.mutag_request(mutag_record, unique_id),
        headers={"traceparent": traceparent},
    )
    assert response.status_code == 200
    assert response.headers["traceparent"] == traceparent
    [row] = await kafka.fetch("SELECT traceparent FROM inference_requests WHERE request_id = $1", unique_id)
    assert row["traceparent"] == traceparent


async def test_traceparent_created_when_missing(
    client: httpx.AsyncClient, mutag_record: dict, unique_id: str
) -> None:
    response = await client.post(
        "/v1/requests",
        json=datasets.mutag_request(mutag_record, unique_id),
        headers={"traceparent": "garbage"},
    )
    assert response.status_code == 202
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", response.headers["traceparent"])
