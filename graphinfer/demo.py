"""``graphinfer demo``: the main job, end to end, on real data.

1. Start the embedded broker and a database.
2. Train the demo models when the repository has none.
3. Create the topics, apply migrations, start a worker process.
4. Publish the MUTAG held-out graphs and the Cora test-node ego subgraphs.
5. Wait for every reply on ``predictions``, then count the stored rows.
6. Print requests, replies, rows, held-out accuracy, throughput and latency.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from graphinfer.embedded import STATE_DIR, EmbeddedStack, _die_with_parent, terminate_on_sigterm
from graphinfer.errors import ConfigurationError
from graphinfer.progress import open_progress
from graphinfer.settings import Settings

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 180.0
REPLY_TIMEOUT_S = 300.0


@dataclass
class DemoRequest:
    request_id: str
    payload: bytes
    dataset: str
    expected: dict[Any, str]


@dataclass
class Outcome:
    sent_at: float = 0.0
    replied_at: float | None = None
    reply: dict[str, Any] | None = None


@dataclass
class DemoReport:
    requests: list[DemoRequest]
    outcomes: dict[str, Outcome]
    elapsed_s: float
    rows: dict[str, int] = field(default_factory=dict)
    manifests: dict[str, Any] = field(default_factory=dict)


def build_requests(run_id: str, cora_limit: int | None = None) -> list[DemoRequest]:
    """Build the MUTAG held-out and Cora test-node requests with their expected labels."""
    from graphinfer.models import datasets

    requests: list[DemoRequest] = []
    _, mutag_test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    for record in mutag_test:
        request_id = f"{run_id}-mutag-{record['id']}"
        payload = datasets.mutag_request(record, request_id)
        requests.append(
            DemoRequest(request_id, _encode(payload), "mutag", {None: datasets.mutag_class_name(record)})
        )

    cora = datasets.load_cora()
    test_nodes = [int(node) for node in cora.node_ids if cora.split[int(node)] == "test"]
    for node in test_nodes[:cora_limit]:
        request_id = f"{run_id}-cora-{node}"
        payload = datasets.cora_ego_request(cora, node, request_id)
        expected = {node: cora.class_names[int(cora.labels[node])]}
        requests.append(DemoRequest(request_id, _encode(payload), "cora", expected))
    return requests


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


class ReplyWaiter:
    """Reads ``predictions`` from the beginning and resolves the reply of each request id."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10, group_id=None
        )
        self.topic = topic
        self.waiting: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        await self.consumer.topics()  # refreshes metadata so the topic's partitions are known
        partitions = self.consumer.partitions_for_topic(self.topic) or set()
        self.consumer.assign([TopicPartition(self.topic, partition) for partition in partitions])
        await self.consumer.seek_to_beginning()
        self._task = asyncio.create_task(self._read())

    def expect(self, request_id: str) -> asyncio.Future[tuple[float, dict[str, Any]]]:
        future = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        return future

    async def _read(self) -> None:
        async for message in self.consumer:
            reply = json.loads(message.value)
            future = self.waiting.pop(reply.get("request_id") or "", None)
            if future is not None and not future.done():
                future.set_result((time.perf_counter(), reply))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()


async def publish_and_wait(
    requests: list[DemoRequest],
    bootstrap: str,
    settings: Settings,
    *,
    window: int,
    progress: Callable[[int, int], None],
    worker_alive: Callable[[], bool],
) -> tuple[dict[str, Outcome], float]:
    """Send requests with at most ``window`` in flight; return each outcome and the elapsed time."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=0, max_request_size=settings.max_message_bytes + 65_536
    )
    waiter = ReplyWaiter(bootstrap, settings.prediction_topic)
    await producer.start()
    await waiter.start()
    outcomes = {request.request_id: Outcome() for request in requests}
    slots = asyncio.Semaphore(window)
    done = 0

    async def one(request: DemoRequest) -> None:
        nonlocal done
        async with slots:
            outcome = outcomes[request.request_id]
            future = waiter.expect(request.request_id)
            outcome.sent_at = time.perf_counter()
            await producer.send_and_wait(
                settings.request_topic, request.payload, key=request.request_id.encode()
            )
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while not future.done():
                if time.monotonic() > deadline or not worker_alive():
                    future.cancel()
                    return
                await asyncio.wait([future], timeout=1.0)
            outcome.replied_at, outcome.reply = future.result()
            done += 1
            progress(done, len(requests))

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(request) for request in requests))
        return outcomes, time.perf_counter() - started
    finally:
        await waiter.stop()
        await producer.stop()


def _accuracy(
    requests: list[DemoRequest], outcomes: dict[str, Outcome], dataset: str
) -> tuple[float, int, str]:
    correct = total = 0
    model = ""
    for request in requests:
        if request.dataset != dataset:
            continue
        reply = outcomes[request.request_id].reply
        total += 1
        if reply is None or reply["status"] != "ok" or not reply["results"]:
            continue
        result = reply["results"][0]
        model = f"{result['model']}@{result['version']}"
        output = result["output"]
        if dataset == "mutag":
            correct += output["label"] == request.expected[None]
        else:
            predicted = {node["id"]: node["label"] for node in output["nodes"]}
            correct += all(predicted.get(node) == label for node, label in request.expected.items())
    return (correct / total if total else float("nan")), total, model


def format_report(report: DemoReport, window: int) -> str:
    requests, outcomes = report.requests, report.outcomes
    replies = [outcome for outcome in outcomes.values() if outcome.reply is not None]
    statuses = Counter(outcome.reply["status"] for outcome in replies if outcome.reply is not None)
    latencies = np.array(
        [
            (outcome.replied_at - outcome.sent_at) * 1000.0
            for outcome in replies
            if outcome.replied_at is not None
        ]
    )
    lines = [
        "",
        "graphinfer demo",
        f"  requests sent          {len(requests):>6}  (MUTAG held-out graphs "
        f"{sum(r.dataset == 'mutag' for r in requests)}, Cora test-node 2-hop ego subgraphs "
        f"{sum(r.dataset == 'cora' for r in requests)})",
        f"  replies received       {len(replies):>6}  ({', '.join(f'{s} {n}' for s, n in sorted(statuses.items()))})",
        f"  rows in PostgreSQL     {report.rows.get('inference_requests', 0):>6}  inference_requests, "
        f"{report.rows.get('predictions', 0)} predictions",
    ]
    bars = {"mutag": 0.80, "cora": 0.75}
    for dataset, label in (("mutag", "MUTAG held-out graphs"), ("cora", "Cora Planetoid test nodes")):
        accuracy, total, model = _accuracy(requests, outcomes, dataset)
        if not total:
            continue
        verdict = "at or above" if accuracy >= bars[dataset] else "BELOW"
        lines.append(
            f"  held-out accuracy      {accuracy:6.3f}  {model} on {total} {label}, scored through the "
            f"service ({verdict} the {bars[dataset]:.2f} bar)"
        )
    for name, manifest in sorted(report.manifests.items()):
        for metric_name, metric in manifest.metrics.items():
            spread = f" ± {metric.std:.3f}" if metric.std is not None else ""
            lines.append(
                f"  manifest metric        {metric.value:6.3f}{spread}  {name} {metric_name}: {metric.protocol}"
            )
    if len(latencies):
        lines += [
            f"  throughput             {len(replies) / report.elapsed_s:6.1f}  requests/s "
            f"({window} in flight, {report.elapsed_s:.1f} s)",
            f"  latency p50 / p99      {np.percentile(latencies, 50):6.1f} / {np.percentile(latencies, 99):.1f} ms"
            "  (publish to reply on predictions)",
        ]
    lines.append(
        f"  machine                {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.machine()}"
    )
    return "\n".join(lines)


async def count_rows(database_url: str, prefix: str) -> dict[str, int]:
    import asyncpg

    connection = await asyncpg.connect(database_url)
    try:
        requests = await connection.fetchval(
            "SELECT count(*) FROM inference_requests WHERE request_id LIKE $1", prefix + "%"
        )
        predictions = await connection.fetchval(
            "SELECT count(*) FROM predictions WHERE request_id LIKE $1", prefix + "%"
        )
    finally:
        await connection.close()
    return {"inference_requests": int(requests), "predictions": int(predictions)}


def start_worker(environment: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "graphinfer", "worker"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )


def stop_worker(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def run_demo(settings: Settings, *, repository: Path | None, window: int, cora_limit: int | None) -> int:
    """Run the demo; return the process exit code (0 when every request was answered ok)."""
    with terminate_on_sigterm():
        target = (repository or settings.model_repository).resolve()
        return asyncio.run(_run(settings, target, window, cora_limit))


async def _run(settings: Settings, repository: Path, window: int, cora_limit: int | None) -> int:
    from graphinfer.models.repository import scan
    from graphinfer.models.training import DEMO_MODELS, train_demo
    from graphinfer.settings import load_settings
    from graphinfer.streams.runner import preflight

    # 1. Embedded broker and database.
    stack = EmbeddedStack(database_name="graphinfer_demo")
    await stack.start()
    worker: subprocess.Popen[bytes] | None = None
    try:
        print(
            f"embedded broker at {stack.broker.bootstrap_servers}, database {stack.database_name}", flush=True
        )

        # 2. Demo models.
        catalog = scan(repository)
        if not len(catalog):
            print(f"training the demo models into {repository} ...", flush=True)
            with open_progress("training", len(DEMO_MODELS), unit="models") as display:
                await asyncio.to_thread(
                    train_demo,
                    repository,
                    seed=0,
                    progress=lambda line: display.write("  " + line),
                    model_progress=lambda done, total: display.update_to(done),
                )
            catalog = scan(repository)
        manifests = {entry.ref: entry.manifest for entry in catalog.serving()}
        print(f"serving {', '.join(sorted(manifests))}", flush=True)

        # 3. Topics, migrations and a worker process.
        environment = {**os.environ, **stack.environment(), "GRAPHINFER_MODEL_REPOSITORY": str(repository)}
        demo_settings = load_settings(
            kafka_bootstrap_servers=stack.broker.bootstrap_servers,
            database_url=stack.database_url,
            model_repository=repository,
        )
        await preflight(demo_settings)
        log_path = STATE_DIR / f"demo-worker-{os.getpid()}.log"
        worker = start_worker(environment, log_path)
        print(f"worker started (pid {worker.pid}, log {log_path})", flush=True)

        def worker_alive() -> bool:
            return worker is not None and worker.poll() is None

        # 4. Warm up: the first reply waits for the consumer group to form.
        run_id = f"demo-{uuid.uuid4().hex[:12]}"
        requests = build_requests(run_id, cora_limit)
        warm_up = build_requests(f"warmup-{run_id}", 1)
        warm_up = [request for request in warm_up if request.dataset == "cora"][:1] + warm_up[:1]
        started = time.monotonic()
        outcomes, _ = await publish_and_wait(
            warm_up,
            stack.broker.bootstrap_servers,
            demo_settings,
            window=2,
            progress=lambda done, total: None,
            worker_alive=worker_alive,
        )
        if any(outcome.reply is None for outcome in outcomes.values()):
            raise ConfigurationError(f"the worker did not answer the warm-up requests; see {log_path}")
        print(
            f"worker answering after {time.monotonic() - started:.1f} s; sending {len(requests)} requests",
            flush=True,
        )

        # 5. The measured run.
        with open_progress("answered", len(requests), unit="requests") as display:
            outcomes, elapsed = await publish_and_wait(
                requests,
                stack.broker.bootstrap_servers,
                demo_settings,
                window=window,
                progress=lambda done, total: display.update_to(done),
                worker_alive=worker_alive,
            )
        rows = await count_rows(stack.database_url, f"{run_id}-")
        report = DemoReport(requests, outcomes, elapsed, rows, manifests)

        # 6. The table and the verdict.
        print(format_report(report, window), flush=True)
        missing = [request_id for request_id, outcome in outcomes.items() if outcome.reply is None]
        not_ok = [
            request_id
            for request_id, outcome in outcomes.items()
            if outcome.reply is not None and outcome.reply["status"] != "ok"
        ]
        if missing:
            print(
                f"FAILED: {len(missing)} requests got no reply (first: {missing[0]}); worker log: {log_path}"
            )
            return 1
        if not_ok:
            print(f"FAILED: {len(not_ok)} replies were not ok (first: {not_ok[0]})")
            return 1
        if rows.get("inference_requests") != len(requests):
            print(
                f"FAILED: {rows.get('inference_requests')} request rows stored for {len(requests)} requests"
            )
            return 1
        print("every request was answered ok")
        return 0
    finally:
        if worker is not None:
            stop_worker(worker)
        stack.stop()
