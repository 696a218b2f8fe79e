"""Helpers for the reliability tests: model repositories, ledgers of sent messages and audits.

A :class:`Ledger` remembers where every published message landed (topic,
partition, offset) and what the test expects of it, so the checks can
compare the broker, the replies and the rows in PostgreSQL message by
message. An :class:`OffsetAudit` samples the worker group's committed
offsets while a test runs and records any offset committed before its
message's outcome was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException
from confluent_kafka import TopicPartition as ConfluentPartition
from sklearn.linear_model import LogisticRegression

from graphinfer.models.manifest import FeatureSpec, InputSignature
from tests import fake_models
from tests.conftest import WorkerProcess
from tests.kafka_client import KafkaTestClient
from tests.model_factory import write_model

# Graph-level WL histogram: 32 buckets plus 4 statistics columns.
STRUCTURE_FEATURES = FeatureSpec(name="wl_histogram", params={"dim": 32, "iterations": 2}, version=1)
STRUCTURE_WIDTH = 36
# Node-level SGC propagation of 2-dimensional node features.
NODE_FEATURES = FeatureSpec(name="sgc", params={"hops": 2}, version=1)


def _fitted(width: int, seed: int) -> LogisticRegression:
    """A logistic regression fitted on random rows, so a wrong feature width raises."""
    generator = np.random.default_rng(seed)
    matrix = generator.normal(size=(40, width))
    labels = np.arange(40) % 2
    return LogisticRegression(max_iter=200).fit(matrix, labels)


def write_structure_models(repository: Path) -> Path:
    """Publish ``structure`` (graph task) and ``node-sgc`` (node task) into ``repository``.

    ``structure`` reads the WL histogram of the node attribute ``label``,
    which ignores direction, parallel edges and self-loops, and accepts
    directed and undirected graphs alike. ``node-sgc`` reads 2-dimensional
    node features and also accepts either kind of graph.
    """
    write_model(
        repository,
        "structure",
        1,
        _fitted(STRUCTURE_WIDTH, seed=1),
        task="graph",
        features=STRUCTURE_FEATURES,
        signature=InputSignature(task="graph", node_attributes=["label"], directed=None),
    )
    write_model(
        repository,
        "node-sgc",
        1,
        _fitted(2, seed=2),
        task="node",
        features=NODE_FEATURES,
        signature=InputSignature(task="node", feature_dim=2, directed=None),
    )
    return repository


def write_healthy_model(repository: Path, *, sleep_s: float = 0.0) -> Path:
    """Publish ``healthy``: a graph-task model with constant output, or one that sleeps on every call."""
    estimator: Any = fake_models.SleepingModel(sleep_s) if sleep_s else fake_models.ConstantModel([0.2, 0.8])
    write_model(repository, "healthy", 1, estimator)
    return repository


@dataclass
class Sent:
    """One published message and what the test expects of it."""

    topic: str
    partition: int
    offset: int
    request_id: str | None
    expect_reply: bool
    expect_dead_letter: bool | None
    kind: str = ""


@dataclass
class Ledger:
    """Every message a test published, by position on the broker."""

    sent: list[Sent] = field(default_factory=list)

    async def publish(
        self,
        client: KafkaTestClient,
        value: bytes | dict[str, Any] | None,
        *,
        request_id: str | None,
        expect_reply: bool = True,
        expect_dead_letter: bool | None = False,
        key: bytes | str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        kind: str = "",
    ) -> Sent:
        metadata = await client.publish(value, key=key, headers=headers)
        entry = Sent(
            topic=metadata.topic,
            partition=metadata.partition,
            offset=metadata.offset,
            request_id=request_id,
            expect_reply=expect_reply,
            expect_dead_letter=expect_dead_letter,
            kind=kind,
        )
        self.sent.append(entry)
        return entry

    async def publish_requests(self, client: KafkaTestClient, requests: list[dict[str, Any]]) -> None:
        """Publish valid requests concurrently, so the producer batches them."""
        await asyncio.gather(
            *(self.publish(client, request, request_id=request["request_id"]) for request in requests)
        )

    @property
    def request_ids(self) -> list[str]:
        return [entry.request_id for entry in self.sent if entry.request_id is not None]


@dataclass
class Outcomes:
    """What PostgreSQL and the reply topic hold for a ledger's messages."""

    requests: dict[tuple[int, int], list[dict[str, Any]]]
    dead_letters: dict[tuple[int, int], list[dict[str, Any]]]
    predictions: Counter[tuple[str, str]]
    replies: dict[str, list[dict[str, Any]]]

    def terminal(self, entry: Sent) -> int:
        """Count the terminal records of one offset: a dead letter, or an accepted request row."""
        key = (entry.partition, entry.offset)
        accepted = [row for row in self.requests.get(key, []) if row["status"] != "rejected"]
        return len(self.dead_letters.get(key, [])) + len(accepted)


async def fetch_outcomes(client: KafkaTestClient, ledger: Ledger) -> Outcomes:
    topic = client.request_topic
    request_rows = await client.fetch(
        "SELECT request_id, status, kafka_partition, kafka_offset FROM inference_requests WHERE topic = $1",
        topic,
    )
    letter_rows = await client.fetch(
        "SELECT kafka_partition, kafka_offset, code, request_id FROM dead_letters WHERE topic = $1", topic
    )
    prediction_rows = await client.fetch(
        "SELECT request_id, model FROM predictions WHERE request_id = ANY($1)", ledger.request_ids
    )
    requests: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in request_rows:
        requests.setdefault((row["kafka_partition"], row["kafka_offset"]), []).append(dict(row))
    dead_letters: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in letter_rows:
        dead_letters.setdefault((row["kafka_partition"], row["kafka_offset"]), []).append(dict(row))
    predictions = Counter((row["request_id"], row["model"]) for row in prediction_rows)
    replies = {request_id: list(client.replies.get(request_id, [])) for request_id in ledger.request_ids}
    return Outcomes(requests, dead_letters, predictions, replies)


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, interval_s: float = 0.2
) -> float:
    """Poll ``check`` until it returns true; return the seconds waited, or fail naming ``what``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)
    return time.monotonic() - started


async def wait_for_terminal(client: KafkaTestClient, ledger: Ledger, timeout_s: float) -> Outcomes:
    """Wait until every ledger entry has a terminal record in PostgreSQL; return the outcomes."""
    latest: list[Outcomes] = []

    async def all_terminal() -> bool:
        outcomes = await fetch_outcomes(client, ledger)
        latest[:] = [outcomes]
        return all(outcomes.terminal(entry) >= 1 for entry in ledger.sent)

    try:
        await wait_until(all_terminal, timeout_s, "a terminal record for every message", interval_s=0.5)
    except AssertionError:
        missing = [entry for entry in ledger.sent if latest and latest[0].terminal(entry) == 0]
        raise AssertionError(
            f"{len(missing)} messages have no terminal record, first: {missing[:3]}"
        ) from None
    return latest[0]


async def wait_for_replies(client: KafkaTestClient, request_ids: list[str], timeout_s: float) -> None:
    async def answered() -> bool:
        return all(client.replies.get(request_id) for request_id in request_ids)

    await wait_until(answered, timeout_s, f"replies to {len(request_ids)} requests")


class CommittedOffsets:
    """Reads a group's committed offsets without joining the group.

    confluent-kafka is used because aiokafka 0.14.0's admin client fails to
    decode Tansu's OffsetFetch response.
    """

    def __init__(self, bootstrap: str, group_id: str, topic: str) -> None:
        self.topic = topic
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False}
        )

    def read(self) -> dict[int, int]:
        """Return partition to committed offset, leaving out partitions with none."""
        metadata = self._consumer.list_topics(self.topic, timeout=5)
        partitions = [
            ConfluentPartition(self.topic, number) for number in metadata.topics[self.topic].partitions
        ]
        committed = self._consumer.committed(partitions, timeout=5)
        return {tp.partition: tp.offset for tp in committed if tp.offset >= 0}

    def close(self) -> None:
        self._consumer.close()


async def read_committed(client: KafkaTestClient, group_id: str) -> dict[int, int]:
    reader = CommittedOffsets(client.bootstrap, group_id, client.request_topic)
    try:
        return await asyncio.to_thread(reader.read)
    finally:
        await asyncio.to_thread(reader.close)


class OffsetAudit:
    """Samples the group's committed offsets and checks each against the stored outcomes.

    An offset ``o`` committed on partition ``p`` says every message of ``p``
    below ``o`` is finished, so each such message in the ledger must already
    have a terminal record. Offsets are read before rows, and rows only
    grow, so a violation seen here is real.
    """

    def __init__(self, client: KafkaTestClient, ledger: Ledger, group_id: str) -> None:
        self.client = client
        self.ledger = ledger
        self.samples = 0
        self.violations: list[str] = []
        self._reader = CommittedOffsets(client.bootstrap, group_id, client.request_topic)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OffsetAudit:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._reader.close)

    async def check_once(self) -> None:
        try:
            offsets = await asyncio.to_thread(self._reader.read)
        except KafkaException:
            return
        if not offsets:
            return
        outcomes = await fetch_outcomes(self.client, self.ledger)
        self.samples += 1
        for partition, offset in offsets.items():
            for entry in self.ledger.sent:
                if entry.partition == partition and entry.offset < offset and outcomes.terminal(entry) == 0:
                    self.violations.append(
                        f"partition {partition} committed offset {offset} before offset {entry.offset} "
                        f"(request_id={entry.request_id}) was stored"
                    )

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(0.2)


def log_lines(worker: WorkerProcess, pattern: str) -> list[str]:
    return [line for line in worker.log().splitlines() if re.search(pattern, line)]


def assignment_count(worker: WorkerProcess) -> int:
    return len(log_lines(worker, r"partitions assigned assignment="))


def report(test: str, **figures: Any) -> None:
    """Print one line of measured figures; ``pytest -s`` shows them for docs/reliability.md."""
    print(f"\nRELIABILITY {test}: " + " ".join(f"{name}={value}" for name, value in figures.items()))
