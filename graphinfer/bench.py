"""``graphinfer bench``: throughput and latency of running workers, from publish to reply.

Sends MUTAG graph requests, or Cora ego-subgraph node requests, with a fixed
number in flight, and prints requests per second and latency percentiles
with the machine they were measured on. It measures the workers the
settings point at; with ``--embedded`` it starts the stack and one worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
import uuid

import numpy as np

from graphinfer.demo import DemoRequest, publish_and_wait, start_worker, stop_worker
from graphinfer.embedded import STATE_DIR, EmbeddedStack
from graphinfer.models import datasets
from graphinfer.progress import open_progress
from graphinfer.settings import Settings, load_settings


def bench_requests(run_id: str, kind: str, count: int) -> list[DemoRequest]:
    requests: list[DemoRequest] = []
    if kind == "mutag":
        records = datasets.load_mutag()
        for index in range(count):
            request_id = f"{run_id}-{index}"
            payload = datasets.mutag_request(records[index % len(records)], request_id)
            requests.append(DemoRequest(request_id, json.dumps(payload).encode(), "mutag", {}))
    else:
        cora = datasets.load_cora()
        nodes = [int(node) for node in cora.node_ids if cora.split[int(node)] == "test"]
        for index in range(count):
            request_id = f"{run_id}-{index}"
            payload = datasets.cora_ego_request(cora, nodes[index % len(nodes)], request_id)
            requests.append(DemoRequest(request_id, json.dumps(payload).encode(), "cora", {}))
    return requests


def machine() -> str:
    return (
        f"{platform.node()}: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs available, "
        f"Python {platform.python_version()}"
    )


async def measure(settings: Settings, kind: str, count: int, window: int, alive: object = None) -> str:
    """Send ``count`` requests with ``window`` in flight; return the printed report."""
    run_id = f"bench-{uuid.uuid4().hex[:10]}"
    worker_alive = alive if callable(alive) else (lambda: True)
    warm = bench_requests(f"{run_id}-warm", kind, 1)
    await publish_and_wait(
        warm,
        settings.kafka_bootstrap_servers or "",
        settings,
        window=1,
        progress=lambda done, total: None,
        worker_alive=worker_alive,
    )
    requests = bench_requests(run_id, kind, count)
    # Progress goes to stderr, so stdout carries only the report.
    with open_progress("answered", len(requests), unit="requests", stream=sys.stderr) as display:
        outcomes, elapsed = await publish_and_wait(
            requests,
            settings.kafka_bootstrap_servers or "",
            settings,
            window=window,
            progress=lambda done, total: display.update_to(done),
            worker_alive=worker_alive,
        )
    latencies = np.array(
        [
            (outcome.replied_at - outcome.sent_at) * 1000.0
            for outcome in outcomes.values()
            if outcome.replied_at
        ]
    )
    answered = len(latencies)
    lines = [
        machine(),
        f"{kind} requests: {count} sent, {answered} answered, {window} in flight",
        f"throughput: {answered / elapsed:.1f} requests/s over {elapsed:.1f} s",
    ]
    if answered:
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        lines.append(f"latency ms: p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  max {latencies.max():.1f}")
    return "\n".join(lines)


def run_bench(settings: Settings, *, kind: str, count: int, window: int, embedded: bool) -> str:
    if not embedded:
        settings.bootstrap_servers  # noqa: B018 - raises ConfigurationError when unset
        return asyncio.run(measure(settings, kind, count, window))
    return asyncio.run(_embedded(settings, kind, count, window))


async def _embedded(settings: Settings, kind: str, count: int, window: int) -> str:
    from graphinfer.models.repository import scan
    from graphinfer.models.training import DEMO_MODELS, train_demo
    from graphinfer.streams.runner import preflight

    stack = EmbeddedStack(database_name="graphinfer_bench")
    await stack.start()
    worker = None
    try:
        repository = settings.model_repository.resolve()
        if not len(await asyncio.to_thread(scan, repository)):
            with open_progress("training", len(DEMO_MODELS), unit="models", stream=sys.stderr) as display:
                await asyncio.to_thread(
                    train_demo,
                    repository,
                    progress=display.write,
                    model_progress=lambda done, total: display.update_to(done),
                )
        local = load_settings(
            kafka_bootstrap_servers=stack.broker.bootstrap_servers,
            database_url=stack.database_url,
            model_repository=repository,
        )
        await preflight(local)
        environment = {**os.environ, **stack.environment(), "GRAPHINFER_MODEL_REPOSITORY": str(repository)}
        worker = start_worker(environment, STATE_DIR / f"bench-worker-{os.getpid()}-{int(time.time())}.log")
        return await measure(
            local, kind, count, window, alive=lambda: worker is not None and worker.poll() is None
        )
    finally:
        if worker is not None:
            stop_worker(worker)
        stack.stop()
