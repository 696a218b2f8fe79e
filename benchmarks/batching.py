"""Dynamic batching: model-stage and end-to-end speed-ups, batching on against off.

Run with ``.venv/bin/python benchmarks/batching.py``. On MUTAG graphs (18
nodes on average) it measures, for a logistic regression and a 200-tree
random forest on the WL histogram:

1. the model stage alone: ``predict_proba`` one row per call against
   stacked batches of 64 rows;
2. end to end: a worker on the embedded broker with
   ``GRAPHINFER_BATCH_MAX_SIZE=1`` against 64, 2,000 requests kept 256 in
   flight, from publish to the reply on ``predictions``.

It prints the machine first; compare ratios from one run, not figures
across machines.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from graphinfer.demo import DemoRequest, publish_and_wait, start_worker, stop_worker
from graphinfer.embedded import EmbeddedStack
from graphinfer.models import datasets
from graphinfer.models.decode import Limits, decode_request
from graphinfer.models.features import extract
from graphinfer.models.manifest import FeatureSpec, InputSignature
from graphinfer.settings import load_settings
from graphinfer.streams.runner import preflight

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.model_factory import write_model

FEATURES = FeatureSpec(name="wl_histogram", params={"iterations": 3, "dim": 1024}, version=1)
REQUESTS = 2_000
IN_FLIGHT = 256


def machine() -> str:
    return (
        f"{platform.node()}: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs available, "
        f"Python {platform.python_version()}, {platform.platform()}"
    )


def mutag_features() -> tuple[np.ndarray, np.ndarray, list[dict]]:
    records = datasets.load_mutag()
    rows, labels = [], []
    for record in records:
        raw = json.dumps(datasets.mutag_request(record, "bench")).encode()
        rows.append(extract(FEATURES, decode_request(raw, Limits()).graph, "graph")[0])
        labels.append(datasets.mutag_class_name(record))
    return np.vstack(rows), np.asarray(labels), records


def model_stage(estimator: object, matrix: np.ndarray, repeats: int = 5) -> tuple[float, float]:
    """Return microseconds per row for one-row calls and for 64-row calls (best of ``repeats``)."""
    single = batched = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for row in matrix:
            estimator.predict_proba(row[np.newaxis, :])  # type: ignore[attr-defined]
        single = min(single, (time.perf_counter() - started) / len(matrix) * 1e6)
        started = time.perf_counter()
        for offset in range(0, len(matrix), 64):
            estimator.predict_proba(matrix[offset : offset + 64])  # type: ignore[attr-defined]
        batched = min(batched, (time.perf_counter() - started) / len(matrix) * 1e6)
    return single, batched


async def end_to_end(
    stack: EmbeddedStack, repository: Path, model: str, batch_size: int, records: list[dict]
) -> float:
    """Return requests per second through a worker with the given batch size."""
    prefix = f"bench{model}{batch_size}{int(time.time())}"
    environment = {
        **os.environ,
        **stack.environment(),
        "GRAPHINFER_MODEL_REPOSITORY": str(repository),
        "GRAPHINFER_BATCH_MAX_SIZE": str(batch_size),
        "GRAPHINFER_APP_ID": prefix,
        "GRAPHINFER_REQUEST_TOPIC": f"{prefix}.requests",
        "GRAPHINFER_PREDICTION_TOPIC": f"{prefix}.predictions",
        "GRAPHINFER_LOG_LEVEL": "WARNING",
    }
    settings = load_settings(
        kafka_bootstrap_servers=stack.broker.bootstrap_servers,
        database_url=stack.database_url,
        request_topic=f"{prefix}.requests",
        prediction_topic=f"{prefix}.predictions",
    )
    await preflight(settings)
    log_path = Path(tempfile.gettempdir()) / f"{prefix}.log"
    worker = start_worker(environment, log_path)
    try:
        warm = [_request(f"{prefix}-warm", records[0], model)]
        await publish_and_wait(
            warm,
            stack.broker.bootstrap_servers,
            settings,
            window=1,
            progress=lambda done, total: None,
            worker_alive=lambda: worker.poll() is None,
        )
        requests = [
            _request(f"{prefix}-{index}", records[index % len(records)], model) for index in range(REQUESTS)
        ]
        outcomes, elapsed = await publish_and_wait(
            requests,
            stack.broker.bootstrap_servers,
            settings,
            window=IN_FLIGHT,
            progress=lambda done, total: None,
            worker_alive=lambda: worker.poll() is None,
        )
        answered = sum(
            outcome.reply is not None and outcome.reply["status"] == "ok" for outcome in outcomes.values()
        )
        if answered != REQUESTS:
            raise RuntimeError(f"only {answered} of {REQUESTS} requests were answered ok; see {log_path}")
        return REQUESTS / elapsed
    finally:
        stop_worker(worker)


def _request(request_id: str, record: dict, model: str) -> DemoRequest:
    payload = datasets.mutag_request(record, request_id)
    payload["models"] = [model]
    return DemoRequest(request_id, json.dumps(payload).encode(), "mutag", {})


async def main() -> None:
    print(machine())
    matrix, labels, records = mutag_features()
    models = {
        "linear": LogisticRegression(max_iter=2_000).fit(matrix, labels),
        "forest": RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=1).fit(matrix, labels),
    }
    print("\nmodel stage, microseconds per row (best of 5 passes over the 188 MUTAG graphs)")
    print(f"{'model':<8} {'1 row/call':>12} {'64 rows/call':>14} {'speed-up':>9}")
    for name, estimator in models.items():
        single, batched = model_stage(estimator, matrix)
        print(f"{name:<8} {single:>12.1f} {batched:>14.1f} {single / batched:>8.1f}x")

    repository = Path(tempfile.mkdtemp(prefix="graphinfer-bench-"))
    signature = InputSignature(task="graph", node_attributes=["label"], directed=False)
    for name, estimator in models.items():
        write_model(
            repository,
            f"bench-{name}",
            1,
            estimator,
            features=FEATURES,
            signature=signature,
            class_names=tuple(str(label) for label in estimator.classes_),
        )
    stack = EmbeddedStack(database_name="graphinfer_bench")
    await stack.start()
    try:
        print(
            f"\nend to end, requests per second ({REQUESTS} requests, {IN_FLIGHT} in flight, embedded broker)"
        )
        print(f"{'model':<8} {'batch 1':>10} {'batch 64':>10} {'speed-up':>9}")
        for name in models:
            off = await end_to_end(stack, repository, f"bench-{name}", 1, records)
            on = await end_to_end(stack, repository, f"bench-{name}", 64, records)
            print(f"{name:<8} {off:>10.0f} {on:>10.0f} {on / off:>8.1f}x")
    finally:
        stack.stop()


if __name__ == "__main__":
    asyncio.run(main())
