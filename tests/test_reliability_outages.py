"""Outages of the worker's dependencies: PostgreSQL down past the poll interval, the broker restarted."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphinfer.embedded import PrivateCluster, ensure_database
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
    write_healthy_model,
)

pytestmark = pytest.mark.integration

MAX_POLL_INTERVAL_S = 4.0


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_healthy_model(tmp_path_factory.mktemp("slow-models"), sleep_s=0.1)


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
