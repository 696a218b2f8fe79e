"""A gateway whose topics no worker reads yet: timeouts, disconnects, load shedding and late services."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from graphinfer.embedded import free_port
from graphinfer.models import datasets
from tests.conftest import WorkerProcess, start_worker_process
from tests.gateway_process import GatewayProcess, start_gateway
from tests.kafka_client import KafkaTestClient

pytestmark = pytest.mark.integration

MAX_IN_FLIGHT = 2


@pytest.fixture(scope="module")
def private_environment(worker: WorkerProcess, session_id: str) -> dict[str, str]:
    """Settings of a deployment of its own: app id and topics that the session worker does not read."""
    prefix = f"p{session_id}"
    return {
        **worker.environment,
        "GRAPHINFER_APP_ID": f"graphinfer-{prefix}",
        "GRAPHINFER_REQUEST_TOPIC": f"{prefix}.graph-requests",
        "GRAPHINFER_REPLAY_TOPIC": f"{prefix}.graph-requests.replay",
        "GRAPHINFER_PREDICTION_TOPIC": f"{prefix}.predictions",
        "GRAPHINFER_REPLY_TOPIC": f"{prefix}.graph-replies",
        "GRAPHINFER_DEAD_LETTER_TOPIC": f"{prefix}.graph-requests.dlq",
        "GRAPHINFER_KAFKA_SESSION_TIMEOUT_S": "6",
        "GRAPHINFER_POOL_PROCESSES": "1",
    }


@pytest.fixture(scope="module")
def idle_gateway(
    private_environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    environment = {
        **private_environment,
        "GRAPHINFER_GATEWAY_TIMEOUT_S": "5",
        "GRAPHINFER_GATEWAY_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
    }
    process = start_gateway(environment, tmp_path_factory.mktemp("idle-gateway") / "gateway.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def mutag_record() -> dict:
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    return test[3]


async def wait_for_metric(
    gateway: GatewayProcess, name: str, value: float, timeout_s: float, **labels: str
) -> float:
    """Poll a metric until it equals ``value`` or ``timeout_s`` passes; return the last value read."""
    deadline = time.monotonic() + timeout_s
    found = await gateway.metric_async(name, **labels)
    for _ in range(10_000):
        if found == value or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
        found = await gateway.metric_async(name, **labels)
    return found


def test_open_gateway_warns_at_start(idle_gateway: GatewayProcess) -> None:
    assert "GRAPHINFER_API_KEYS is empty" in idle_gateway.log()


async def test_client_disconnect_removes_waiter(
    idle_gateway: GatewayProcess, mutag_record: dict, unique_id: str
) -> None:
    disconnected_before = await idle_gateway.metric_async(
        "graphinfer_gateway_waits_total", outcome="disconnected"
    )
    async with httpx.AsyncClient(base_url=idle_gateway.url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/predict", json=datasets.mutag_request(mutag_record, unique_id))
    started = time.monotonic()

    # The gateway waits 5 s for a reply; it notices the closed connection long before.
    found = await wait_for_metric(
        idle_gateway, "graphinfer_gateway_waits_total", disconnected_before + 1, 2.0, outcome="disconnected"
    )
    assert found == disconnected_before + 1
    assert time.monotonic() - started < 2.0
    assert await wait_for_metric(idle_gateway, "graphinfer_gateway_pending_replies", 0, 1.0) == 0
    assert await wait_for_metric(idle_gateway, "graphinfer_gateway_in_flight_requests", 0, 1.0) == 0


async def test_in_flight_limit_is_429(
    idle_gateway: GatewayProcess, mutag_record: dict, unique_id: str
) -> None:
    async with httpx.AsyncClient(base_url=idle_gateway.url, timeout=10) as client:
        held = [
            asyncio.create_task(
                client.post(
                    "/v1/predict",
                    params={"timeout_s": 1.5},
                    json=datasets.mutag_request(mutag_record, f"{unique_id}-{index}"),
                )
            )
            for index in range(MAX_IN_FLIGHT)
        ]
        assert (
            await wait_for_metric(idle_gateway, "graphinfer_gateway_in_flight_requests", MAX_IN_FLIGHT, 5.0)
            == 2
        )

        over = await client.post(
            "/v1/predict", json=datasets.mutag_request(mutag_record, f"{unique_id}-over")
        )
        assert over.status_code == 429
        assert over.headers["retry-after"] == "1"
        assert over.json()["error"]["code"] == "too_many_requests"
        assert "GRAPHINFER_GATEWAY_MAX_IN_FLIGHT" in over.json()["error"]["message"]

        answers = await asyncio.gather(*held)
    assert [answer.status_code for answer in answers] == [504] * MAX_IN_FLIGHT


async def test_stopped_worker_504_then_result(
    idle_gateway: GatewayProcess,
    private_environment: dict[str, str],
    tmp_path: Path,
    kafka: KafkaTestClient,
    mutag_record: dict,
    unique_id: str,
) -> None:
    request = datasets.mutag_request(mutag_record, unique_id)
    async with httpx.AsyncClient(base_url=idle_gateway.url, timeout=10) as client:
        timed_out = await client.post("/v1/predict", params={"timeout_s": 1}, json=request)
        assert timed_out.status_code == 504
        assert timed_out.json()["request_id"] == unique_id
        assert timed_out.json()["status"] == "pending"
        assert timed_out.json()["error"]["code"] == "reply_timeout"
        assert timed_out.headers["location"] == f"/v1/requests/{unique_id}"

        polled = await client.get(f"/v1/requests/{unique_id}")
        assert polled.status_code == 200
        assert polled.json()["status"] == "pending"

        # A worker for these topics starts and reads the request that waited in the topic.
        log_path = tmp_path / "private-worker.log"
        worker = start_worker_process(private_environment, log_path)
        try:
            deadline = time.monotonic() + 90
            while (polled := await client.get(f"/v1/requests/{unique_id}")).json()["status"] == "pending":
                assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "no result within 90 s of starting the worker"
                await asyncio.sleep(0.2)
            assert polled.json()["status"] == "ok"

            # Retrying the call now returns the stored result at once.
            retried = await client.post("/v1/predict", params={"timeout_s": 1}, json=request)
            assert retried.status_code == 200
            assert retried.json() == polled.json()
        finally:
            worker.terminate()
            with contextlib.suppress(Exception):
                worker.wait(timeout=30)
            if worker.poll() is None:
                worker.kill()

    rows = await kafka.fetch("SELECT status FROM inference_requests WHERE request_id = $1", unique_id)
    assert [row["status"] for row in rows] == ["ok"]


class TcpProxy:
    """A loopback TCP forwarder that listens only after start(), standing in for a service that starts late."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        pipes = [
            asyncio.create_task(_pipe(reader, upstream_writer)),
            asyncio.create_task(_pipe(upstream_reader, writer)),
        ]
        self._tasks.update(pipes)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65_536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def late_services(private_environment: dict[str, str]) -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    broker_host, _, broker_port = private_environment["GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS"].partition(":")
    database = urlsplit(private_environment["GRAPHINFER_DATABASE_URL"])
    proxies = (
        TcpProxy(broker_host, int(broker_port)),
        TcpProxy(database.hostname or "127.0.0.1", database.port or 5432),
    )
    yield proxies
    for proxy in proxies:
        await proxy.stop()


async def test_gateway_waits_for_broker_and_database(
    private_environment: dict[str, str], late_services: tuple[TcpProxy, TcpProxy], tmp_path: Path
) -> None:
    broker, database = late_services
    url = urlsplit(private_environment["GRAPHINFER_DATABASE_URL"])
    user_info = url.netloc.rpartition("@")[0]
    environment = {
        **private_environment,
        "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{broker.port}",
        "GRAPHINFER_DATABASE_URL": urlunsplit(url._replace(netloc=f"{user_info}@127.0.0.1:{database.port}")),
        "GRAPHINFER_DATABASE_CONNECT_TIMEOUT_S": "1",
    }
    gateway = start_gateway(environment, tmp_path / "gateway.log", ready=False)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
            await asyncio.sleep(1.0)
            assert (await client.get("/healthz")).status_code == 200
            not_ready = await client.get("/readyz")
            assert not_ready.status_code == 503
            problems = not_ready.json()["problems"]
            assert "GRAPHINFER_DATABASE_URL" in problems["database"]
            assert gateway.process.poll() is None, "an unreachable database does not stop the gateway"

            await database.start()
            deadline = time.monotonic() + 30
            while "database" in (problems := (await client.get("/readyz")).json()["problems"]):
                assert time.monotonic() < deadline, f"the database was not found within 30 s: {problems}"
                await asyncio.sleep(0.2)
            assert "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS" in problems["broker"]

            await broker.start()
            while (ready := await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, f"not ready 30 s after the services started: {ready.text}"
                await asyncio.sleep(0.2)
            assert ready.json()["status"] == "ready"
    finally:
        # Stopped without blocking the event loop, which runs the proxies the gateway closes through.
        gateway.process.terminate()
        for _ in range(600):
            if gateway.process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        gateway.stop()
    assert "database ready after" in gateway.log()
