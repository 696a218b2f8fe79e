"""Worker faults in the middle of a batch: SIGKILL, an exception in the batch step, SIGTERM.

Each test publishes 200 requests to a worker whose model sleeps
on every call, so batches take long enough to be interrupted, and audits
the group's committed offsets against the rows in PostgreSQL throughout.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess, launch_worker, private_environment, stop_worker
from tests.kafka_client import KafkaTestClient
from tests.model_factory import graph_request
from tests.reliability_support import (
    Ledger,
    OffsetAudit,
    Outcomes,
    fetch_outcomes,
    log_lines,
    read_committed,
    report,
    wait_for_replies,
    wait_for_terminal,
    wait_until,
    write_healthy_model,
)

pytestmark = pytest.mark.integration

REQUESTS = 200


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_healthy_model(tmp_path_factory.mktemp("slow-models"), sleep_s=0.2)


@pytest.fixture
def fault_environment(worker_environment: dict[str, str], slow_repository: Path) -> dict[str, str]:
    # A short session timeout lets a restarted worker take over a killed one's partitions quickly.
    return private_environment(
        worker_environment,
        f"faults{uuid.uuid4().hex[:8]}",
        GRAPHINFER_MODEL_REPOSITORY=str(slow_repository),
        GRAPHINFER_BATCH_MAX_SIZE="32",
        GRAPHINFER_KAFKA_SESSION_TIMEOUT_S="3",
    )


@pytest.fixture
async def fault_client(fault_environment: dict[str, str]) -> AsyncIterator[KafkaTestClient]:
    # The worker creates the topics; the client starts after the first worker is up.
    client = KafkaTestClient(fault_environment)
    yield client
    await client.stop()


async def _publish_all(client: KafkaTestClient, ledger: Ledger, prefix: str) -> None:
    await ledger.publish_requests(
        client, [graph_request(f"{prefix}-{index}", models=["healthy"]) for index in range(REQUESTS)]
    )


async def _stored_count(client: KafkaTestClient, ledger: Ledger) -> int:
    outcomes = await fetch_outcomes(client, ledger)
    return sum(1 for entry in ledger.sent if outcomes.terminal(entry))


def _check_exactly_once(outcomes: Outcomes, ledger: Ledger) -> None:
    missing = [entry for entry in ledger.sent if outcomes.terminal(entry) == 0]
    doubled = [entry for entry in ledger.sent if outcomes.terminal(entry) > 1]
    assert missing == [], f"{len(missing)} requests have no stored outcome"
    assert doubled == [], f"{len(doubled)} requests have more than one stored outcome"
    assert sorted(outcomes.predictions.values()) == [1] * len(ledger.sent), "one result row per request"


def _reply_counts(client: KafkaTestClient, ledger: Ledger) -> list[int]:
    return [len(client.replies.get(request_id, [])) for request_id in ledger.request_ids]


async def test_sigkill_mid_batch_loses_nothing(
    fault_environment: dict[str, str], fault_client: KafkaTestClient, tmp_path: Path
) -> None:
    first = launch_worker(fault_environment, tmp_path / "first.log")
    await fault_client.start()
    ledger = Ledger()
    second: WorkerProcess | None = None
    async with OffsetAudit(fault_client, ledger, fault_environment["GRAPHINFER_APP_ID"]) as audit:
        try:
            await _publish_all(fault_client, ledger, "kill")
            await wait_until(lambda: _has_at_least(fault_client, ledger, 40), 60, "the first stored batches")
            os.kill(first.process.pid, signal.SIGKILL)
            first.process.wait(timeout=10)
            stored_at_kill = await _stored_count(fault_client, ledger)

            second = launch_worker(fault_environment, tmp_path / "second.log")
            outcomes = await wait_for_terminal(fault_client, ledger, timeout_s=120)
            await wait_for_replies(fault_client, ledger.request_ids, timeout_s=60)
            await audit.check_once()
        finally:
            if first.process.poll() is None:
                first.process.kill()
            if second is not None:
                stop_worker(second)

    assert 0 < stored_at_kill < REQUESTS, "the kill landed while requests were still being processed"
    _check_exactly_once(outcomes, ledger)
    assert audit.violations == []
    assert audit.samples > 0
    replies = _reply_counts(fault_client, ledger)
    assert min(replies) >= 1
    report(
        "sigkill_mid_batch",
        sent=len(ledger.sent),
        stored_at_kill=stored_at_kill,
        replies=sum(replies),
        repeated_replies=sum(count - 1 for count in replies),
        rows=sum(outcomes.predictions.values()),
        duplicate_rows=0,
        lost=0,
        audit_samples=audit.samples,
    )


async def test_batch_exception_commits_nothing_unstored(
    fault_environment: dict[str, str], fault_client: KafkaTestClient, tmp_path: Path
) -> None:
    environment = dict(fault_environment, GRAPHINFER_FAULT_INJECTION_RAISE_AFTER_MESSAGES="100")
    worker = launch_worker(environment, tmp_path / "worker.log")
    await fault_client.start()
    ledger = Ledger()
    async with OffsetAudit(fault_client, ledger, environment["GRAPHINFER_APP_ID"]) as audit:
        try:
            await _publish_all(fault_client, ledger, "raise")
            outcomes = await wait_for_terminal(fault_client, ledger, timeout_s=120)
            await wait_for_replies(fault_client, ledger.request_ids, timeout_s=60)
            await audit.check_once()
        finally:
            stop_worker(worker)

    [failure] = log_lines(worker, r"batch failed with an unexpected error")
    assert "InjectedFault" in worker.log()
    assert not log_lines(worker, r"batch failed again|message failed with an unexpected error")
    _check_exactly_once(outcomes, ledger)
    assert outcomes.dead_letters == {}
    assert audit.violations == []
    replies = _reply_counts(fault_client, ledger)
    assert replies == [1] * len(ledger.sent), "the failed batch is answered once, after its retry"
    report(
        "batch_exception",
        sent=len(ledger.sent),
        failed_batch=failure.split("once more ")[-1],
        replies=sum(replies),
        rows=sum(outcomes.predictions.values()),
        dead_letters=0,
        duplicate_rows=0,
        lost=0,
        audit_samples=audit.samples,
    )


async def test_sigterm_drains_and_commits(
    fault_environment: dict[str, str], fault_client: KafkaTestClient, tmp_path: Path
) -> None:
    first = launch_worker(fault_environment, tmp_path / "first.log")
    await fault_client.start()
    ledger = Ledger()
    second: WorkerProcess | None = None
    async with OffsetAudit(fault_client, ledger, fault_environment["GRAPHINFER_APP_ID"]) as audit:
        try:
            await _publish_all(fault_client, ledger, "term")
            await wait_until(lambda: _has_at_least(fault_client, ledger, 40), 60, "the first stored batches")
            first.process.send_signal(signal.SIGTERM)
            exit_code = first.process.wait(timeout=60)
            stored_at_stop = await fetch_outcomes(fault_client, ledger)
            committed = await read_committed(fault_client, fault_environment["GRAPHINFER_APP_ID"])

            second = launch_worker(fault_environment, tmp_path / "second.log")
            outcomes = await wait_for_terminal(fault_client, ledger, timeout_s=120)
            await wait_for_replies(fault_client, ledger.request_ids, timeout_s=60)
            await audit.check_once()
        finally:
            if first.process.poll() is None:
                first.process.kill()
            if second is not None:
                stop_worker(second)

    stored = [entry for entry in ledger.sent if stored_at_stop.terminal(entry)]
    assert 0 < len(stored) < REQUESTS, "SIGTERM landed while requests were still being processed"
    assert exit_code == 0
    # Everything stored before the stop is committed, and nothing beyond it.
    for entry in ledger.sent:
        is_committed = entry.offset < committed.get(entry.partition, 0)
        assert is_committed == bool(stored_at_stop.terminal(entry)), entry
    _check_exactly_once(outcomes, ledger)
    assert audit.violations == []
    replies = _reply_counts(fault_client, ledger)
    assert replies == [1] * len(ledger.sent), "a rolling restart repeats no request"
    report(
        "sigterm_drain",
        sent=len(ledger.sent),
        stored_at_stop=len(stored),
        replies=sum(replies),
        repeated_replies=0,
        rows=sum(outcomes.predictions.values()),
        duplicate_rows=0,
        lost=0,
        audit_samples=audit.samples,
    )


async def _has_at_least(client: KafkaTestClient, ledger: Ledger, count: int) -> bool:
    return await _stored_count(client, ledger) >= count
