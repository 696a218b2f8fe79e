"""The worker end to end: requests on the real topic, replies on predictions, rows in PostgreSQL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from graphinfer.models import datasets
from tests.conftest import WorkerProcess
from tests.kafka_client import KafkaTestClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mutag_test_records() -> list[dict]:
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    return test


@pytest.fixture(scope="module")
def cora() -> datasets.CoraData:
    return datasets.load_cora()


def _graph_output(reply: dict, model: str) -> dict:
    result = next(item for item in reply["results"] if item["model"] == model)
    assert result["status"] == "ok", result
    return result["output"]


async def test_worker_fetch_wait_is_effective(worker: WorkerProcess, kafka: KafkaTestClient) -> None:
    match = re.search(r"worker started .* fetch_max_wait_ms=(\d+)", worker.log())
    assert match is not None, worker.log()[-2000:]
    assert int(match.group(1)) == 10


def _local_label(model_repository: Path, record: dict) -> str:
    """Classify one MUTAG graph in-process with the served artifact and the library's features."""
    from graphinfer.models.decode import Limits, decode_request
    from graphinfer.models.features import extract
    from graphinfer.models.repository import load_estimator, scan

    entry = scan(model_repository).resolve("mutag-wl")
    estimator = load_estimator(entry, frozenset())
    raw = json.dumps(datasets.mutag_request(record, "local")).encode()
    graph = decode_request(raw, Limits()).graph
    probabilities = estimator.predict_proba(extract(entry.manifest.features, graph, "graph"))[0]
    return entry.manifest.output.class_names[int(probabilities.argmax())]


async def test_mutag_graph_comes_back_with_its_class(
    kafka: KafkaTestClient, mutag_test_records: list[dict], model_repository: Path, unique_id: str
) -> None:
    record = next(
        record
        for record in mutag_test_records
        if _local_label(model_repository, record) == datasets.mutag_class_name(record)
    )
    await kafka.publish(datasets.mutag_request(record, unique_id))
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["status"] == "ok"
    assert reply["source"] == "online"
    assert [result["model"] for result in reply["results"]] == ["mutag-wl"]
    output = _graph_output(reply, "mutag-wl")
    assert output["label"] == datasets.mutag_class_name(record)
    assert set(output["probabilities"]) == {"mutagenic", "non_mutagenic"}
    assert abs(sum(output["probabilities"].values()) - 1.0) < 1e-6
    assert output["probabilities"][output["label"]] >= 0.5


async def test_other_client_library_gets_reply(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    # Teams publish with other clients too; confluent-kafka (librdkafka) is the common one.
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka.bootstrap, "enable.idempotence": False})
    payload = json.dumps(datasets.mutag_request(mutag_test_records[5], unique_id)).encode()
    producer.produce(kafka.request_topic, value=payload, key=unique_id.encode())
    assert producer.flush(30) == 0
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["status"] == "ok"


async def test_mutag_held_out_labels_match_mostly(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    correct = 0
    for position, record in enumerate(mutag_test_records):
        await kafka.publish(datasets.mutag_request(record, f"{unique_id}-{position}"))
    for position, record in enumerate(mutag_test_records):
        [reply] = await kafka.wait_for_replies(f"{unique_id}-{position}")
        correct += _graph_output(reply, "mutag-wl")["label"] == datasets.mutag_class_name(record)
    assert correct / len(mutag_test_records) >= 0.80


async def test_request_rows_stored(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    await kafka.publish(datasets.mutag_request(mutag_test_records[1], unique_id))
    [reply] = await kafka.wait_for_replies(unique_id)

    [request_row] = await kafka.fetch("SELECT * FROM inference_requests WHERE request_id = $1", unique_id)
    prediction_rows = await kafka.fetch("SELECT * FROM predictions WHERE request_id = $1", unique_id)
    assert request_row["status"] == "ok"
    assert request_row["source"] == "online"
    assert request_row["topic"] == kafka.request_topic
    assert request_row["reply"]["results"] == reply["results"]
    assert [(row["model"], row["version"], row["status"]) for row in prediction_rows] == [
        ("mutag-wl", 1, "ok")
    ]
    assert prediction_rows[0]["output"] == _graph_output(reply, "mutag-wl")


async def test_cora_ego_request_scores_its_target(
    kafka: KafkaTestClient, cora: datasets.CoraData, unique_id: str
) -> None:
    node = next(int(node) for node in cora.node_ids if cora.split[int(node)] == "test")
    await kafka.publish(datasets.cora_ego_request(cora, node, unique_id))
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["status"] == "ok"
    output = _graph_output(reply, "cora-sgc")
    assert [item["id"] for item in output["nodes"]] == [node]
    assert output["nodes"][0]["label"] in cora.class_names


async def test_redelivered_request_keeps_one_row_per_model(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_test_records[2], unique_id)
    await kafka.publish(request)
    [first] = await kafka.wait_for_replies(unique_id)
    await kafka.publish(request)
    replies = await kafka.wait_for_replies(unique_id, count=2)

    assert replies[1] == first, "a redelivered finished request re-emits its stored reply"
    rows = await kafka.fetch("SELECT model FROM predictions WHERE request_id = $1", unique_id)
    assert [row["model"] for row in rows] == ["mutag-wl"]
    requests = await kafka.fetch(
        "SELECT count(*) AS n FROM inference_requests WHERE request_id = $1", unique_id
    )
    assert requests[0]["n"] == 1


async def test_reused_id_with_other_graph_conflicts(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    await kafka.publish(datasets.mutag_request(mutag_test_records[3], unique_id))
    [first] = await kafka.wait_for_replies(unique_id)
    await kafka.publish(datasets.mutag_request(mutag_test_records[4], unique_id))
    replies = await kafka.wait_for_replies(unique_id, count=2)

    assert replies[1]["status"] == "rejected"
    assert replies[1]["error"]["code"] == "request_id_conflict"
    [row] = await kafka.fetch("SELECT reply FROM inference_requests WHERE request_id = $1", unique_id)
    assert row["reply"] == first, "the stored result of the first request stays"


async def test_invalid_graph_rejected_and_dead_lettered(kafka: KafkaTestClient, unique_id: str) -> None:
    request = {
        "request_id": unique_id,
        "graph": {"nodes": [{"id": "a"}], "edges": [{"source": "a", "target": "ghost"}]},
        "task": "graph",
    }
    await kafka.publish(request)
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["status"] == "rejected"
    assert reply["error"]["code"] == "invalid_graph"
    assert "'ghost'" in reply["error"]["message"]
    letter = await kafka.wait_for_dead_letter(lambda message: message.key == unique_id.encode())
    headers = dict(letter.headers)
    assert headers["graphinfer-dlq-code"] == b"invalid_graph"
    assert headers["graphinfer-dlq-topic"] == kafka.request_topic.encode()
    assert json.loads(letter.value) == request
    rows = await kafka.fetch("SELECT code, request_id FROM dead_letters WHERE request_id = $1", unique_id)
    assert [(row["code"], row["request_id"]) for row in rows] == [("invalid_graph", unique_id)]


async def test_undecodable_bytes_dead_lettered(kafka: KafkaTestClient, unique_id: str) -> None:
    await kafka.publish(b"\xff\xfe not json", key=unique_id)
    letter = await kafka.wait_for_dead_letter(lambda message: message.key == unique_id.encode())

    assert dict(letter.headers)["graphinfer-dlq-code"] == b"invalid_encoding"
    rows = await kafka.fetch(
        "SELECT code FROM dead_letters WHERE topic = $1 AND kafka_partition = $2 AND kafka_offset = $3",
        kafka.request_topic,
        int(dict(letter.headers)["graphinfer-dlq-partition"]),
        int(dict(letter.headers)["graphinfer-dlq-offset"]),
    )
    assert [row["code"] for row in rows] == ["invalid_encoding"]


async def test_graph_without_fitting_model_rejected(kafka: KafkaTestClient, unique_id: str) -> None:
    # No node carries the 'label' attribute the MUTAG model reads.
    request = {
        "request_id": unique_id,
        "graph": {"nodes": [{"id": 1}, {"id": 2}], "edges": [{"source": 1, "target": 2}]},
        "task": "graph",
    }
    await kafka.publish(request)
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["status"] == "rejected"
    assert reply["error"]["code"] == "no_model_selected"


async def test_unknown_model_rejected(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_test_records[0], unique_id)
    request["models"] = ["no-such-model"]
    await kafka.publish(request)
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["error"]["code"] == "unknown_model"
    assert "no-such-model" in reply["error"]["message"]


async def test_explicit_misfit_model_is_error_result(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_test_records[0], unique_id)
    request["models"] = ["mutag-wl", "cora-sgc"]
    del request["task"]
    await kafka.publish(request)
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["status"] == "partial"
    by_model = {result["model"]: result for result in reply["results"]}
    assert by_model["mutag-wl"]["status"] == "ok"
    assert by_model["cora-sgc"]["error"]["code"] == "incompatible_input"


async def test_implicit_misfit_model_is_skipped(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_test_records[0], unique_id)
    del request["task"]
    await kafka.publish(request)
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["status"] == "ok"
    assert [result["model"] for result in reply["results"]] == ["mutag-wl"]
    assert [(item["model"], item["code"]) for item in reply["skipped"]] == [
        ("cora-links", "incompatible_input"),
        ("cora-sgc", "incompatible_input"),
        ("karate-club", "incompatible_input"),
        ("otc-fraud", "incompatible_input"),
    ]


async def test_expired_request_not_computed(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_test_records[0], unique_id)
    request["deadline"] = "2020-01-01T00:00:00Z"
    await kafka.publish(request)
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["status"] == "expired"
    assert reply["results"] == []
    rows = await kafka.fetch("SELECT model FROM predictions WHERE request_id = $1", unique_id)
    assert rows == []


async def test_metadata_echoed(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_test_records[0], unique_id)
    request["metadata"] = {"tenant": "t1", "trace": "abc"}
    await kafka.publish(
        request,
        headers=[("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
    )
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["metadata"] == {"tenant": "t1", "trace": "abc"}
    [row] = await kafka.fetch("SELECT traceparent FROM inference_requests WHERE request_id = $1", unique_id)
    assert row["traceparent"].startswith("00-0af7651916cd43dd")


async def test_message_over_producer_limit_dead_lettered(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    # Bigger than the producer's request size: the dead-letter copy must be cut to fit.
    request = datasets.mutag_request(mutag_test_records[0], unique_id)
    request["graph"]["nodes"][0]["pad"] = "x" * 1_200_000
    await kafka.publish(request)
    letter = await kafka.wait_for_dead_letter(lambda message: message.key == unique_id.encode())

    headers = dict(letter.headers)
    assert headers["graphinfer-dlq-code"] == b"message_too_large"
    assert int(headers["graphinfer-dlq-truncated"]) > 1_200_000
    assert len(letter.value) < int(headers["graphinfer-dlq-truncated"])
    assert letter.value == json.dumps(request).encode()[: len(letter.value)]

    after = f"{unique_id}-after"
    await kafka.publish(datasets.mutag_request(mutag_test_records[0], after))
    [reply] = await kafka.wait_for_replies(after)
    assert reply["status"] == "ok"


async def test_same_id_twice_back_to_back_answered_once(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_test_records[8], unique_id)
    await kafka.publish(request)
    await kafka.publish(request)
    first, second = await kafka.wait_for_replies(unique_id, count=2)

    assert first == second
    rows = await kafka.fetch("SELECT model FROM predictions WHERE request_id = $1", unique_id)
    assert len(rows) == 1


async def test_same_id_other_graph_back_to_back_conflicts(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    await kafka.publish(datasets.mutag_request(mutag_test_records[9], unique_id))
    await kafka.publish(datasets.mutag_request(mutag_test_records[10], unique_id))
    first, second = await kafka.wait_for_replies(unique_id, count=2)

    assert first["status"] == "ok"
    assert second["status"] == "rejected"
    assert second["error"]["code"] == "request_id_conflict"


async def test_corrected_request_reuses_rejected_id(
    kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    request = datasets.mutag_request(mutag_test_records[11], unique_id)
    await kafka.publish({**request, "colour": "blue"})
    [rejected] = await kafka.wait_for_replies(unique_id)
    await kafka.publish(request)
    replies = await kafka.wait_for_replies(unique_id, count=2)

    assert rejected["error"]["code"] == "invalid_request"
    assert replies[1]["status"] == "ok"
    [row] = await kafka.fetch("SELECT status FROM inference_requests WHERE request_id = $1", unique_id)
    assert row["status"] == "ok"


async def test_unreadable_message_answered_under_key(kafka: KafkaTestClient, unique_id: str) -> None:
    await kafka.publish(b"{not json", key=unique_id)
    [reply] = await kafka.wait_for_replies(unique_id)

    assert reply["status"] == "rejected"
    assert reply["error"]["code"] == "invalid_json"


async def test_worker_metrics_served(
    worker: WorkerProcess, kafka: KafkaTestClient, mutag_test_records: list[dict], unique_id: str
) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    await kafka.publish(datasets.mutag_request(mutag_test_records[0], unique_id))
    await kafka.wait_for_replies(unique_id)
    match = re.search(r"metrics served url=(\S+)", worker.log())
    assert match is not None
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(match.group(1))).text

    families = {family.name for family in text_string_to_metric_families(text)}
    for name in (
        "graphinfer_worker_messages",
        "graphinfer_worker_dead_letters",
        "graphinfer_worker_batch_size",
        "graphinfer_worker_model_latency_seconds",
        "graphinfer_worker_model_results",
        "graphinfer_worker_end_to_end_seconds",
    ):
        assert name in families, name
    assert 'graphinfer_worker_model_results_total{model="mutag-wl",outcome="ok",version="1"}' in text
