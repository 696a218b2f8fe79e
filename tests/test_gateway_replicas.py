"""Several gateway replicas: reply routing under load, restarts and the partition lease."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from graphinfer.api.lease import lease_key
from graphinfer.models import datasets
from tests.conftest import WorkerProcess
from tests.gateway_process import GatewayProcess, start_gateway
from tests.kafka_client import KafkaTestClient
from tests.reliability_support import wait_until

pytestmark = pytest.mark.integration

REQUESTS_PER_REPLICA = 500
CONCURRENCY_PER_REPLICA = 32


@pytest.fixture(scope="module")
def replica_environment(worker: WorkerProcess) -> dict[str, str]:
    return {**worker.environment, "GRAPHINFER_GATEWAY_TIMEOUT_S": "30", "GRAPHINFER_LOG_LEVEL": "INFO"}


@pytest.fixture(scope="module")
def replicas(
    replica_environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[GatewayProcess]]:
    directory = tmp_path_factory.mktemp("replicas")
    started = [
        start_gateway(replica_environment, directory / f"gateway-{index}.log", ready=False)
        for index in range(2)
    ]
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture(scope="module")
def mutag_requests() -> list[dict]:
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    return test


async def send_all(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response | Exception]:
    """POST every body to /v1/predict with at most ``concurrency`` in flight; keep errors in place."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def send(body: dict) -> httpx.Response | Exception:
            async with semaphore:
                try:
                    return await client.post("/v1/predict", json=body)
                except httpx.HTTPError as exc:
                    return exc

        return await asyncio.gather(*(send(body) for body in bodies))


async def count_leases(database_url: str, topic: str) -> int:
    key = lease_key(topic) & 0xFFFF_FFFF
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND classid = $1::oid",
            key,
        )
    finally:
        await connection.close()


async def test_two_replicas_answer_their_own_requests(
    replicas: list[GatewayProcess], mutag_requests: list[dict], kafka: KafkaTestClient
) -> None:
    run = uuid.uuid4().hex[:8]
    batches = [
        [
            datasets.mutag_request(
                mutag_requests[index % len(mutag_requests)], f"load-{run}-{replica}-{index}"
            )
            for index in range(REQUESTS_PER_REPLICA)
        ]
        for replica in range(len(replicas))
    ]

    results = await asyncio.gather(
        *(
            send_all(replica.url, batch, CONCURRENCY_PER_REPLICA)
            for replica, batch in zip(replicas, batches, strict=True)
        )
    )

    for replica, batch, responses in zip(replicas, batches, results, strict=True):
        failures = [
            (body["request_id"], response if isinstance(response, Exception) else response.text[:200])
            for body, response in zip(batch, responses, strict=True)
            if isinstance(response, Exception) or response.status_code != 200
        ]
        assert failures == [], f"{len(failures)} failed, first: {failures[:3]}\n{replica.log()[-2000:]}"
        answered = [response.json() for response in responses if isinstance(response, httpx.Response)]
        assert [reply["request_id"] for reply in answered] == [body["request_id"] for body in batch]
        assert {reply["status"] for reply in answered} == {"ok"}

    partitions = {await replica.metric_async("graphinfer_gateway_reply_partition") for replica in replicas}
    assert len(partitions) == len(replicas), "each replica leases its own partition"
    for replica in replicas:
        assert await replica.metric_async("graphinfer_gateway_replies_total", outcome="foreign") == 0
        assert (
            await replica.metric_async("graphinfer_gateway_replies_total", outcome="matched")
            == REQUESTS_PER_REPLICA
        )
        assert await replica.metric_async("graphinfer_gateway_pending_replies") == 0
        assert await replica.metric_async("graphinfer_gateway_in_flight_requests") == 0

    rows = await kafka.fetch(
        "SELECT status, count(*) AS n FROM inference_requests WHERE request_id LIKE $1 GROUP BY status",
        f"load-{run}-%",
    )
    assert {row["status"]: row["n"] for row in rows} == {"ok": REQUESTS_PER_REPLICA * len(replicas)}


async def test_killed_replica_leaves_no_pending_state(
    replicas: list[GatewayProcess],
    replica_environment: dict[str, str],
    mutag_requests: list[dict],
    kafka: KafkaTestClient,
    tmp_path: Path,
) -> None:
    topic = replica_environment["GRAPHINFER_REPLY_TOPIC"]
    database_url = replica_environment["GRAPHINFER_DATABASE_URL"]
    run = uuid.uuid4().hex[:8]
    bodies = [
        datasets.mutag_request(mutag_requests[index % len(mutag_requests)], f"kill-{run}-{index}")
        for index in range(200)
    ]
    victim = start_gateway(replica_environment, tmp_path / "victim.log")
    assert await count_leases(database_url, topic) == len(replicas) + 1

    # SIGKILL while requests are in flight: no shutdown code runs.
    sending = asyncio.create_task(send_all(victim.url, bodies, 16))
    for _ in range(3_000):
        if await victim.metric_async("graphinfer_gateway_replies_total", outcome="matched") >= 20:
            break
        await asyncio.sleep(0.01)
    victim.stop(signal.SIGKILL)
    first = await sending
    unanswered = [
        body for body, response in zip(bodies, first, strict=True) if not isinstance(response, httpx.Response)
    ]
    assert unanswered, "the kill interrupted some requests"

    # PostgreSQL released the dead replica's lease with its connection.
    assert await count_leases(database_url, topic) == len(replicas)

    restarted = start_gateway(replica_environment, tmp_path / "restarted.log")
    try:
        assert await restarted.metric_async("graphinfer_gateway_pending_replies") == 0
        assert await count_leases(database_url, topic) == len(replicas) + 1

        # Clients retry the requests that got no response, and each retry returns the one stored result.
        second = await send_all(restarted.url, unanswered, 16)
        assert [response.status_code for response in second if isinstance(response, httpx.Response)] == [
            200
        ] * len(unanswered)
        assert {response.json()["status"] for response in second if isinstance(response, httpx.Response)} == {
            "ok"
        }
        assert await restarted.metric_async("graphinfer_gateway_pending_replies") == 0
    finally:
        restarted.stop()

    rows = await kafka.fetch(
        "SELECT status, count(*) AS n FROM inference_requests WHERE request_id LIKE $1 GROUP BY status",
        f"kill-{run}-%",
    )
    assert {row["status"]: row["n"] for row in rows} == {"ok": len(bodies)}


def test_more_replicas_than_partitions_not_ready(
    replica_environment: dict[str, str], session_id: str, tmp_path: Path
) -> None:
    environment = {
        **replica_environment,
        "GRAPHINFER_REPLY_TOPIC": f"t{session_id}.graph-replies-single",
        "GRAPHINFER_REPLY_PARTITIONS": "1",
    }
    first = start_gateway(environment, tmp_path / "first.log")
    second = start_gateway(environment, tmp_path / "second.log", ready=False)
    try:
        time.sleep(1.0)
        response = httpx.get(f"{second.url}/readyz")
        assert response.status_code == 503
        problem = response.json()["problems"]["reply_partition"]
        assert "all 1 partitions" in problem
        assert "GRAPHINFER_REPLY_PARTITIONS" in problem
        assert response.json()["error"]["code"] == "unavailable"

        predict = httpx.post(f"{second.url}/v1/predict", json={"graph": {"nodes": []}})
        assert predict.status_code == 503
        assert predict.json()["error"]["code"] == "unavailable"
        assert predict.headers["retry-after"] == "1"

        # The lease passes on when its holder stops.
        first.stop()
        second.wait_ready(timeout_s=15)
        assert second.metric("graphinfer_gateway_reply_partition") == 0
    finally:
        first.stop()
        second.stop()


async def test_reply_after_lease_moved_read_from_database(
    replica_environment: dict[str, str], worker: WorkerProcess, mutag_requests: list[dict], tmp_path: Path
) -> None:
    gateway = start_gateway(replica_environment, tmp_path / "moved.log")
    database_url = replica_environment["GRAPHINFER_DATABASE_URL"]
    key = lease_key(replica_environment["GRAPHINFER_REPLY_TOPIC"])
    holder = await asyncpg.connect(database_url)
    request_id = f"moved-{uuid.uuid4().hex[:8]}"
    try:
        leased = int(await gateway.metric_async("graphinfer_gateway_reply_partition"))
        # The worker is stopped (SIGSTOP) while the lease moves, so the reply
        # comes afterwards, on the partition this replica no longer reads.
        os.kill(worker.process.pid, signal.SIGSTOP)
        try:
            client = httpx.AsyncClient(base_url=gateway.url, timeout=60)
            posting = asyncio.create_task(
                client.post(
                    "/v1/predict",
                    params={"timeout_s": 30},
                    json=datasets.mutag_request(mutag_requests[0], request_id),
                )
            )

            async def stored() -> bool:
                row = await holder.fetchval(
                    "SELECT 1 FROM inference_requests WHERE request_id = $1", request_id
                )
                return row is not None

            await wait_until(stored, 20, "the request to be stored as pending", interval_s=0.1)

            # End the replica's lease connection and hold its partition, so it leases another one.
            await holder.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid = $1::oid AND objid = $2::oid AND objsubid = 2",
                key & 0xFFFF_FFFF,
                leased,
            )

            async def taken() -> bool:
                return bool(await holder.fetchval("SELECT pg_try_advisory_lock($1, $2)", key, leased))

            await wait_until(taken, 20, "the freed partition", interval_s=0.1)

            async def moved() -> bool:
                partition = await gateway.metric_async("graphinfer_gateway_reply_partition")
                return partition not in (leased, -1)

            await wait_until(moved, 20, "the replica to lease another partition", interval_s=0.1)
        finally:
            os.kill(worker.process.pid, signal.SIGCONT)
        response = await posting
        await client.aclose()

        assert response.status_code == 200, response.text
        assert response.json()["request_id"] == request_id
        assert response.json()["status"] == "ok"
        assert await gateway.metric_async("graphinfer_gateway_waits_total", outcome="stored") >= 1
    finally:
        await holder.close()
        gateway.stop()
