"""Outages of the worker's dependencies: PostgreSQL down past the poll interval, the broker restarted."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from graphinfer.embedded import EmbeddedBroker, PrivateCluster, ensure_database
from tests.conftest import launch_worker, private_environment, stop_worker
from tests.kafka_client import KafkaTestClient
from tests.model_factory import graph_request
from tests.reliability_support import (
    Ledger,
    assignment_count,
    log_lines,
    report,
    wait_for_replies,
    wait_for_terminal,
    wait_until,
    write_healthy_model,
)

pytestmark = pytest.mark.integration

MAX_POLL_INTERVAL_S = 3.0
RESTART_COMMAND = "GRAPHINFER_TEST_KAFKA_RESTART_COMMAND"


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_healthy_model(tmp_path_factory.mktemp("slow-models"), sleep_s=0.1)


@pytest.fixture(scope="module")
def fast_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_healthy_model(tmp_path_factory.mktemp("fast-models"))


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_database_outage_pauses_and_catches_up(
    worker_environment: dict[str, str],
    slow_repository: Path,
    private_cluster: PrivateCluster,
    tmp_path: Path,
) -> None:
    database_url = await ensure_database(private_cluster.url, "graphinfer_outage")
    # Small batches, a small read-ahead buffer and a slow model keep the
    # buffer full when the database goes away, which is when Faust stops
    # fetching by itself.
    environment = private_environment(
        worker_environment,
        f"outage{uuid.uuid4().hex[:8]}",
        GRAPHINFER_DATABASE_URL=database_url,
        GRAPHINFER_MODEL_REPOSITORY=str(slow_repository),
        GRAPHINFER_KAFKA_MAX_POLL_INTERVAL_S=str(MAX_POLL_INTERVAL_S),
        GRAPHINFER_BATCH_RETRY_MAX_DELAY_S="1",
        GRAPHINFER_BATCH_MAX_SIZE="16",
        GRAPHINFER_STREAM_BUFFER_MAXSIZE="64",
        GRAPHINFER_KAFKA_SESSION_TIMEOUT_S="3",
    )
    worker = launch_worker(environment, tmp_path / "worker.log")
    client = KafkaTestClient(environment)
    await client.start()
    ledger = Ledger()
    try:
        # 1. A backlog the worker reads ahead of its slow agent.
        await ledger.publish_requests(
            client, [graph_request(f"backlog-{index}", models=["healthy"]) for index in range(200)]
        )
        await wait_for_replies(client, [f"backlog-{index}" for index in range(16)], timeout_s=60)

        # 2. The database goes away for more than twice the max poll interval,
        #    while requests keep arriving.
        private_cluster.stop_server()
        stopped_at = time.monotonic()
        for index in range(30):
            request_id = f"during-{index}"
            await ledger.publish(client, graph_request(request_id, models=["healthy"]), request_id=request_id)
            await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, 2 * MAX_POLL_INTERVAL_S + 1 - (time.monotonic() - stopped_at)))
        outage_s = time.monotonic() - stopped_at
        private_cluster.start_server()

        # 3. The worker catches up.
        outcomes = await wait_for_terminal(client, ledger, timeout_s=90)
        await wait_for_replies(client, ledger.request_ids, timeout_s=30)
        await asyncio.sleep(1.0)  # a second copy of a reply would arrive now
    finally:
        await client.stop()
        stop_worker(worker)

    replies = {request_id: len(client.replies.get(request_id, [])) for request_id in ledger.request_ids}
    assert all(count == 1 for count in replies.values()), {k: v for k, v in replies.items() if v != 1}
    assert all(outcomes.terminal(entry) == 1 for entry in ledger.sent)
    assert sorted(outcomes.predictions.values()) == [1] * len(ledger.sent)
    assert outage_s > 2 * MAX_POLL_INTERVAL_S

    assert assignment_count(worker) == 1, "a rebalance happened:\n" + "\n".join(
        log_lines(worker, "partitions assigned|LeaveGroup|leave group|rebalanc")
    )
    assert log_lines(worker, r"database unavailable: (read|store) failed")
    assert log_lines(worker, r"consumption paused partitions=")
    [back] = log_lines(worker, r"database available again after")
    assert log_lines(worker, r"consumption resumed partitions=")
    back_after_s = float(re.search(r"after ([\d.]+) s", back).group(1))  # type: ignore[union-attr]
    assert back_after_s > MAX_POLL_INTERVAL_S
    retries = log_lines(worker, r"(read|store) failed, retrying in")
    delays = [float(re.search(r"retrying in ([\d.]+) s", line).group(1)) for line in retries]  # type: ignore[union-attr]
    assert max(delays) == 1.0, delays

    report(
        "database_outage",
        sent=len(ledger.sent),
        outage_s=round(outage_s, 1),
        max_poll_interval_s=MAX_POLL_INTERVAL_S,
        back_after_s=back_after_s,
        retries=len(retries),
        replies=sum(replies.values()),
        rows=sum(outcomes.predictions.values()),
        rebalances=assignment_count(worker) - 1,
        duplicates=sum(count - 1 for count in replies.values() if count > 1),
        lost=sum(1 for entry in ledger.sent if outcomes.terminal(entry) == 0),
    )


async def test_sigterm_during_database_outage_stops_in_time(
    worker_environment: dict[str, str],
    slow_repository: Path,
    private_cluster: PrivateCluster,
    tmp_path: Path,
) -> None:
    database_url = await ensure_database(private_cluster.url, "graphinfer_stop_outage")
    environment = private_environment(
        worker_environment,
        f"stopout{uuid.uuid4().hex[:8]}",
        GRAPHINFER_DATABASE_URL=database_url,
        GRAPHINFER_MODEL_REPOSITORY=str(slow_repository),
        GRAPHINFER_BATCH_RETRY_MAX_DELAY_S="1",
        GRAPHINFER_BATCH_MAX_SIZE="8",
        GRAPHINFER_KAFKA_SESSION_TIMEOUT_S="3",
        GRAPHINFER_SHUTDOWN_TIMEOUT_S="3",
    )
    first = launch_worker(environment, tmp_path / "first.log")
    client = KafkaTestClient(environment)
    await client.start()
    ledger = Ledger()
    second = None
    try:
        await ledger.publish_requests(
            client, [graph_request(f"before-{index}", models=["healthy"]) for index in range(40)]
        )
        await wait_for_replies(client, ["before-0"], timeout_s=60)

        # The database goes away with batches in progress; then the worker gets SIGTERM.
        private_cluster.stop_server()

        async def outage_seen() -> bool:
            return "database unavailable" in first.log()

        await wait_until(outage_seen, 30, "the worker to see the outage")
        first.process.terminate()
        stopping_at = time.monotonic()
        first.process.wait(timeout=60)
        stop_s = time.monotonic() - stopping_at

        # The next worker, once the database is back, processes what the first left.
        private_cluster.start_server()
        second = launch_worker(environment, tmp_path / "second.log")
        outcomes = await wait_for_terminal(client, ledger, timeout_s=90)
    finally:
        if first.process.poll() is None:
            first.process.kill()
        if second is not None:
            stop_worker(second)
        await client.stop()

    assert stop_s < 20, f"the worker took {stop_s:.1f} s to stop"
    assert log_lines(first, r"stopping with \d+ messages not finished after 3 s")
    assert all(outcomes.terminal(entry) == 1 for entry in ledger.sent), "every request stored once"
    assert sorted(outcomes.predictions.values()) == [1] * len(ledger.sent)
    report(
        "sigterm_during_database_outage",
        sent=len(ledger.sent),
        shutdown_timeout_s=3,
        stop_s=round(stop_s, 1),
        exit_code=first.process.returncode,
        rows=sum(outcomes.predictions.values()),
        lost=sum(1 for entry in ledger.sent if outcomes.terminal(entry) == 0),
    )


@pytest.fixture
def private_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker().start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_embedded_broker_restart_reconnects(
    worker_environment: dict[str, str],
    fast_repository: Path,
    private_broker: EmbeddedBroker,
    tmp_path: Path,
) -> None:
    environment = private_environment(
        worker_environment,
        f"restart{uuid.uuid4().hex[:8]}",
        GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS=private_broker.bootstrap_servers,
        GRAPHINFER_MODEL_REPOSITORY=str(fast_repository),
        GRAPHINFER_KAFKA_TOPIC_CHECK_INTERVAL_S="1",
        GRAPHINFER_KAFKA_SESSION_TIMEOUT_S="3",
    )
    worker = launch_worker(environment, tmp_path / "worker.log")
    client = KafkaTestClient(environment)
    await client.start()
    before = [f"before-{index}" for index in range(20)]
    after = [f"after-{index}" for index in range(20)]
    try:
        for request_id in before:
            await client.publish(graph_request(request_id, models=["healthy"]))
        await wait_for_replies(client, before, timeout_s=60)
        await client.stop()

        # Tansu keeps everything in memory: topics, offsets and groups are gone.
        private_broker.stop()
        private_broker.start()
        restarted_at = time.monotonic()

        await wait_until(
            lambda: _has_topics(private_broker.bootstrap_servers, environment), 60, "the recreated topics"
        )
        client = KafkaTestClient(environment)
        await client.start()
        for request_id in after:
            await client.publish(graph_request(request_id, models=["healthy"]))
        try:
            await wait_for_replies(client, after, timeout_s=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; worker log:\n{worker.log()[-6000:]}") from None
        served_after_s = time.monotonic() - restarted_at
        dead_letter_partitions = await _partition_count(
            private_broker.bootstrap_servers, environment["GRAPHINFER_DEAD_LETTER_TOPIC"]
        )
    finally:
        await client.stop()
        stop_worker(worker)

    assert all(client.replies[request_id][0]["status"] == "ok" for request_id in after)
    rows = await client.fetch("SELECT request_id FROM predictions WHERE request_id = ANY($1)", after)
    assert sorted(row["request_id"] for row in rows) == sorted(after), "one result row per request"
    # Tansu would auto-create a topic with 4 partitions; the worker recreates it with its configured 1.
    assert dead_letter_partitions == 1
    assert log_lines(worker, r"broker unreachable at")
    assert log_lines(worker, r"broker reachable again after")
    request_topic = environment["GRAPHINFER_REQUEST_TOPIC"]
    [lost] = log_lines(worker, r"topics missing from the broker, created again")
    assert environment["GRAPHINFER_DEAD_LETTER_TOPIC"] + "(partitions=1)" in lost
    finished = re.findall(rf"{re.escape(request_topic)}:(\d+):(\d+)", lost)
    assert sum(int(offset) + 1 for _, offset in finished) == len(before), lost
    report(
        "embedded_broker_restart",
        before=len(before),
        after=len(after),
        replies_after=sum(len(client.replies[request_id]) for request_id in after),
        rows_after=len(rows),
        served_after_s=round(served_after_s, 1),
        rebalances=assignment_count(worker) - 1,
    )


@pytest.mark.skipif(
    not (os.environ.get("GRAPHINFER_TEST_KAFKA_BOOTSTRAP_SERVERS") and os.environ.get(RESTART_COMMAND)),
    reason=f"needs an external Kafka that keeps its data: set GRAPHINFER_TEST_KAFKA_BOOTSTRAP_SERVERS and "
    f"{RESTART_COMMAND} (a shell command that restarts that broker)",
)
async def test_external_broker_restart_loses_nothing(
    worker_environment: dict[str, str], fast_repository: Path, tmp_path: Path
) -> None:
    environment = private_environment(
        worker_environment,
        f"extrestart{uuid.uuid4().hex[:8]}",
        GRAPHINFER_MODEL_REPOSITORY=str(fast_repository),
        GRAPHINFER_KAFKA_TOPIC_CHECK_INTERVAL_S="1",
    )
    worker = launch_worker(environment, tmp_path / "worker.log")
    client = KafkaTestClient(environment)
    await client.start()
    ledger = Ledger()
    try:
        await ledger.publish_requests(
            client, [graph_request(f"before-{index}", models=["healthy"]) for index in range(100)]
        )
        restart = await asyncio.create_subprocess_shell(os.environ[RESTART_COMMAND])
        assert await asyncio.wait_for(restart.wait(), timeout=300) == 0
        await ledger.publish_requests(
            client, [graph_request(f"after-{index}", models=["healthy"]) for index in range(100)]
        )
        outcomes = await wait_for_terminal(client, ledger, timeout_s=180)
        await wait_for_replies(client, ledger.request_ids, timeout_s=60)
    finally:
        await client.stop()
        stop_worker(worker)

    assert all(outcomes.terminal(entry) == 1 for entry in ledger.sent)
    assert sorted(outcomes.predictions.values()) == [1] * len(ledger.sent)
    assert not log_lines(worker, "topic missing from the broker")
    report(
        "external_broker_restart",
        sent=len(ledger.sent),
        replies=sum(len(client.replies[request_id]) for request_id in ledger.request_ids),
        rows=sum(outcomes.predictions.values()),
        lost=sum(1 for entry in ledger.sent if outcomes.terminal(entry) == 0),
    )


async def _has_topics(bootstrap: str, environment: dict[str, str]) -> bool:
    wanted = {
        environment["GRAPHINFER_PREDICTION_TOPIC"],
        environment["GRAPHINFER_DEAD_LETTER_TOPIC"],
        environment["GRAPHINFER_REQUEST_TOPIC"],
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        return wanted <= set(await admin.list_topics())
    except KafkaError:
        return False
    finally:
        await admin.close()


async def _partition_count(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        await admin.close()
