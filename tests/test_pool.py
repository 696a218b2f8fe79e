"""The inference pool: failing models stay contained, outputs stay JSON-clean."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from pathlib import Path

import pytest

from graphinfer import metrics
from graphinfer.models import datasets
from graphinfer.models.decode import Limits, decode_request
from graphinfer.models.engine import run_batch
from graphinfer.models.pool import InferencePool, Job, PoolOptions
from graphinfer.models.repository import load_estimator, scan
from tests import fake_models
from tests.model_factory import graph_request, write_model


def job(request: dict, refs: list[str]) -> Job:
    return Job(raw=json.dumps(request).encode(), model_refs=tuple(refs))


@pytest.fixture
def fault_repository(tmp_path: Path) -> Path:
    write_model(tmp_path, "healthy", 1, fake_models.ConstantModel([0.2, 0.8]))
    write_model(tmp_path, "raising", 1, fake_models.RaisingModel())
    write_model(tmp_path, "sleeping", 1, fake_models.SleepingModel(30))
    write_model(tmp_path, "allocating", 1, fake_models.AllocatingModel(3_000))
    write_model(tmp_path, "nan", 1, fake_models.NaNModel())
    return tmp_path


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_failing_models_contained_in_one_batch(fault_repository: Path) -> None:
    catalog = scan(fault_repository)
    pool = InferencePool(catalog.entries(), PoolOptions(processes=2, timeout_s=2.0, memory_limit_mb=1_024))
    refs = ["healthy@1", "raising@1", "sleeping@1", "allocating@1", "nan@1"]
    restarts_before = {
        reason: sample("graphinfer_pool_restarts_total", reason=reason)
        for reason in ("timeout", "out_of_memory", "died")
    }
    loads_before = sample("graphinfer_pool_model_loads_total", model="nan", version="1", outcome="loaded")
    try:
        assert await pool.start() == set(refs)
        results = await pool.run([job(graph_request(f"r{index}"), refs) for index in range(3)])

        for per_request in results:
            by_model = {result["model"]: result for result in per_request}
            assert by_model["healthy"]["status"] == "ok"
            assert by_model["healthy"]["output"]["label"] == "yes"
            assert by_model["raising"]["error"]["code"] == "model_failed"
            assert "always fails" in by_model["raising"]["error"]["message"]
            assert by_model["sleeping"]["error"]["code"] == "model_timeout"
            assert "GRAPHINFER_MODEL_TIMEOUT_S" in by_model["sleeping"]["error"]["message"]
            assert by_model["allocating"]["error"]["code"] == "model_out_of_memory"
            assert by_model["nan"]["error"]["code"] == "model_failed"
            assert "non-finite" in by_model["nan"]["error"]["message"]
        assert pool.restarts >= 2
        restarts = {
            reason: sample("graphinfer_pool_restarts_total", reason=reason) - before
            for reason, before in restarts_before.items()
        }
        assert restarts["timeout"] >= 1
        assert restarts["out_of_memory"] >= 1
        assert sum(restarts.values()) == pool.restarts
        # Every process, the replacements included, loaded every model.
        loaded = sample("graphinfer_pool_model_loads_total", model="nan", version="1", outcome="loaded")
        assert loaded - loads_before == 2 + pool.restarts

        # The replaced processes serve the next batch.
        [again] = await pool.run([job(graph_request("after"), ["healthy@1"])])
        assert again[0]["status"] == "ok"
    finally:
        await pool.close()


async def test_model_load_failure_counted(tmp_path: Path) -> None:
    write_model(tmp_path, "healthy", 1, fake_models.ConstantModel([0.2, 0.8]))
    write_model(tmp_path, "tampered", 1, fake_models.ConstantModel([0.5, 0.5]))
    catalog = scan(tmp_path)
    # Changed after the scan checked it: every inference process refuses it.
    catalog.resolve("tampered@1").artifact_path.write_bytes(b"not the published artifact")
    failed_before = sample(
        "graphinfer_pool_model_loads_total", model="tampered", version="1", outcome="failed"
    )
    pool = InferencePool(catalog.entries(), PoolOptions(processes=2, timeout_s=10.0))
    try:
        assert await pool.start() == {"healthy@1"}
    finally:
        await pool.close()
    failed = sample("graphinfer_pool_model_loads_total", model="tampered", version="1", outcome="failed")
    assert failed - failed_before == 2
    assert sample("graphinfer_pool_model_load_seconds_count", model="healthy", version="1") >= 2


async def test_process_killed_while_idle_replaced_before_use(tmp_path: Path) -> None:
    write_model(tmp_path, "healthy", 1, fake_models.ConstantModel([0.2, 0.8]))
    pool = InferencePool(scan(tmp_path).entries(), PoolOptions(processes=1, timeout_s=10.0))
    died_before = sample("graphinfer_pool_restarts_total", reason="died")
    try:
        await pool.start()
        [pid] = pool.pids
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not pool._all or not next(iter(pool._all)).process.is_alive():
                break
            await asyncio.sleep(0.05)

        [results] = await pool.run([job(graph_request("after-kill"), ["healthy@1"])])
        assert results[0]["status"] == "ok", results
        assert pool.pids != [pid]
    finally:
        await pool.close()
    assert sample("graphinfer_pool_restarts_total", reason="died") - died_before == 1


async def test_batched_failure_retried_per_request(tmp_path: Path) -> None:
    # The WL histogram of a bigger graph has larger counts, so only that request trips the model.
    write_model(tmp_path, "picky", 1, fake_models.RowRaisingModel(threshold=50.0))
    pool = InferencePool(scan(tmp_path).entries(), PoolOptions(processes=1, timeout_s=10.0))
    try:
        await pool.start()
        requests = [
            graph_request("small-1", size=3),
            graph_request("large", size=40),
            graph_request("small-2", size=3),
        ]
        results = await pool.run([job(request, ["picky@1"]) for request in requests])
    finally:
        await pool.close()
    assert [per_request[0]["status"] for per_request in results] == ["ok", "error", "ok"]
    assert results[1][0]["error"]["code"] == "model_failed"


@pytest.mark.parametrize(
    ("probabilities", "dtype"), [([0.25, 0.75], "float32"), ([0, 1], "int64"), ([0.5, 0.5], "float16")]
)
async def test_outputs_json_clean(tmp_path: Path, probabilities: list[float], dtype: str) -> None:
    write_model(tmp_path, "typed", 1, fake_models.ConstantModel(probabilities, dtype))
    pool = InferencePool(scan(tmp_path).entries(), PoolOptions(processes=1, timeout_s=10.0))
    try:
        await pool.start()
        [[result]] = await pool.run([job(graph_request("typed"), ["typed@1"])])
    finally:
        await pool.close()
    assert result["status"] == "ok"
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result
    for value in result["output"]["probabilities"].values():
        assert type(value) is float
        assert 0.0 <= value <= 1.0


def test_relabelled_graph_same_output(model_repository: Path) -> None:
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    entry = scan(model_repository).resolve("mutag-wl")
    estimators = {entry.ref: load_estimator(entry, frozenset())}
    manifests = {entry.ref: entry.manifest}
    rng = random.Random(7)
    for record in test[:10]:
        original = datasets.mutag_request(record, "original")
        renamed_ids = {
            node["id"]: f"atom-{rng.randrange(10**9)}-{node['id']}" for node in original["graph"]["nodes"]
        }
        relabelled = json.loads(json.dumps(original))
        for node in relabelled["graph"]["nodes"]:
            node["id"] = renamed_ids[node["id"]]
        for edge in relabelled["graph"]["edges"]:
            edge["source"], edge["target"] = renamed_ids[edge["source"]], renamed_ids[edge["target"]]
        rng.shuffle(relabelled["graph"]["nodes"])
        rng.shuffle(relabelled["graph"]["edges"])

        outputs = []
        for request in (original, relabelled):
            decoded = decode_request(json.dumps(request).encode(), Limits())
            [[result]] = run_batch([decoded], [[entry.ref]], estimators, manifests)
            outputs.append(result["output"])
        assert outputs[0]["label"] == outputs[1]["label"]
        for name, value in outputs[0]["probabilities"].items():
            assert outputs[1]["probabilities"][name] == pytest.approx(value, rel=1e-9)


def test_pool_process_count_default() -> None:
    from graphinfer.settings import Settings

    assert Settings().pool_processes == len(os.sched_getaffinity(0))
