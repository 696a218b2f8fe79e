"""The worker's Prometheus endpoint after real traffic: every family the README lists.

A private worker serves a model that sleeps on every call, so a backlog
builds up on the request topic while the test scrapes ``/metrics``. The lag
it reports must rise above 0, then return to 0 once every reply is out.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import WorkerProcess, launch_worker, private_environment, stop_worker
from tests.kafka_client import KafkaTestClient
from tests.model_factory import graph_request
from tests.reliability_support import wait_for_replies, wait_until, write_healthy_model

pytestmark = pytest.mark.integration

REQUESTS = 40
MODEL = {"model": "healthy", "version": "1"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metrics_environment(
    worker_environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    repository = write_healthy_model(tmp_path_factory.mktemp("metrics-models"), sleep_s=0.25)
    return private_environment(
        worker_environment,
        f"metrics{uuid.uuid4().hex[:8]}",
        GRAPHINFER_MODEL_REPOSITORY=str(repository),
        GRAPHINFER_BATCH_MAX_SIZE="4",
        GRAPHINFER_KAFKA_SESSION_TIMEOUT_S="6",
    )


@pytest.fixture(scope="module")
def metrics_worker(
    metrics_environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    started = launch_worker(metrics_environment, tmp_path_factory.mktemp("metrics-worker") / "worker.log")
    yield started
    stop_worker(started)


@pytest.fixture
async def client(metrics_worker: WorkerProcess) -> AsyncIterator[KafkaTestClient]:
    kafka = KafkaTestClient(metrics_worker.environment)
    await kafka.start()
    yield kafka
    await kafka.stop()


def metrics_url(worker: WorkerProcess) -> str:
    match = re.search(r"metrics served url=(\S+)", worker.log())
    assert match is not None, "the worker logs where it serves its metrics"
    return match.group(1)


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(url)).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def lags(samples: Samples, topic: str) -> dict[str, float]:
    return {
        dict(labels)["partition"]: number
        for (name, labels), number in samples.items()
        if name == "graphinfer_worker_consumer_lag" and dict(labels)["topic"] == topic
    }


async def test_worker_metrics_after_traffic(
    metrics_worker: WorkerProcess, client: KafkaTestClient, metrics_environment: dict[str, str]
) -> None:
    url = metrics_url(metrics_worker)
    topic = metrics_environment["GRAPHINFER_REQUEST_TOPIC"]
    prefix = f"metrics-{uuid.uuid4().hex[:8]}"
    request_ids = [f"{prefix}-{index}" for index in range(REQUESTS)]
    await asyncio.gather(*(client.publish(graph_request(rid, models=["healthy"])) for rid in request_ids))
    await client.publish(graph_request(f"{prefix}-unknown", models=["no-such-model"]))

    # Sample the lag while the backlog drains: 40 requests in batches of 4,
    # each batch at least 0.25 s of model time.
    highest = 0.0

    async def drained() -> bool:
        nonlocal highest
        highest = max(highest, sum(lags(await scrape(url), topic).values()))
        return all(client.replies.get(rid) for rid in request_ids)

    await wait_until(drained, 120, f"replies to {REQUESTS} requests", interval_s=0.1)
    await wait_for_replies(client, [f"{prefix}-unknown"], timeout_s=30)
    assert highest > 0, "the lag rose while the backlog was being worked through"

    # Once traffic stops, every partition that carried requests is back to 0.
    async def caught_up() -> bool:
        current = lags(await scrape(url), topic)
        return bool(current) and all(number == 0 for number in current.values())

    await wait_until(caught_up, 30, "the consumer lag to return to 0")
    samples = await scrape(url)
    assert len(lags(samples, topic)) == 4, "one lag per partition of the request topic"
    lag_topics = {
        dict(labels)["topic"] for name, labels in samples if name == "graphinfer_worker_consumer_lag"
    }
    assert lag_topics <= {topic, metrics_environment["GRAPHINFER_REPLAY_TOPIC"]}, (
        "only the topics with requests"
    )

    # Requests by source and status, rejections by code.
    assert value(samples, "graphinfer_worker_messages_total", source="online", outcome="ok") == REQUESTS
    assert value(samples, "graphinfer_worker_messages_total", source="online", outcome="rejected") == 1
    assert value(samples, "graphinfer_worker_rejections_total", source="online", code="unknown_model") == 1
    assert value(samples, "graphinfer_worker_model_results_total", **MODEL, outcome="ok") == REQUESTS

    # Database writes: one observation per stored batch.
    writes = value(samples, "graphinfer_worker_database_write_seconds_count")
    assert writes is not None and REQUESTS / 4 <= writes <= REQUESTS + 1

    # Measured inside the inference processes and carried back to this scrape.
    processes = int(metrics_environment["GRAPHINFER_POOL_PROCESSES"])
    assert value(samples, "graphinfer_pool_model_loads_total", **MODEL, outcome="loaded") == processes
    assert value(samples, "graphinfer_pool_model_load_seconds_count", **MODEL) == processes
    assert value(samples, "graphinfer_pool_feature_seconds_count", **MODEL) == REQUESTS
    assert value(samples, "graphinfer_pool_predict_rows_total", **MODEL) == REQUESTS
    assert (value(samples, "graphinfer_pool_predict_seconds_sum", **MODEL) or 0) >= 0.25
    assert (value(samples, "graphinfer_pool_decode_seconds_count") or 0) >= REQUESTS
    for slot in range(processes):
        rss = value(samples, "graphinfer_pool_process_max_rss_bytes", slot=str(slot))
        assert rss is not None and rss > 10 * 1024 * 1024, f"slot {slot} reports its peak memory"

    families = {name for name, _ in samples}
    for name in ("graphinfer_worker_end_to_end_seconds_count", "graphinfer_worker_batch_size_count"):
        assert name in families, name
    assert not any(name == "graphinfer_pool_restarts_total" for name, _ in samples), "no process was replaced"
    assert value(samples, "graphinfer_worker_models_refused") == 0
