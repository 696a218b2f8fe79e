"""Online latency with and without a large replay running, measured in one run.

    python benchmarks/replay_isolation.py [--records 20000] [--rate 20] [--seconds 10] [--cycles 3]

1. Start the embedded broker, a database of its own on the local PostgreSQL
   (``GRAPHINFER_DATABASE_URL``, default 127.0.0.1:5432) and one worker.
2. Start ``graphinfer replay --now`` on ``--records`` MUTAG graphs and
   measure the rate at which the worker stores them for 10 s.
3. Repeat ``--cycles`` times: pause the replay's publisher (SIGSTOP), wait
   until the worker has stored all it published, and send MUTAG held-out
   graphs online, open loop at ``--rate`` requests per second for
   ``--seconds``, timing each from publish to its reply on ``predictions``;
   then resume the publisher (SIGCONT) and send the same load again while
   the replay runs. Alternating spreads other load on the machine over both
   conditions.
4. Print the machine, its load, the settings, p50 / p99 / max of the idle
   and the replay phases, the replay's rates and the worker's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphinfer.demo import ReplyWaiter, start_worker, stop_worker  # noqa: E402
from graphinfer.embedded import DEFAULT_DATABASE_URL, EmbeddedBroker, drop_database, ensure_database  # noqa: E402
from graphinfer.models import datasets  # noqa: E402
from graphinfer.replay.examples import mutag_replay_records, write_jsonl  # noqa: E402
from graphinfer.settings import load_settings  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, {cpu}, "
        f"{len(os.sched_getaffinity(0))} CPUs available, Python {platform.python_version()}"
    )


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def online_phase(
    producer: AIOKafkaProducer,
    waiter: ReplyWaiter,
    topic: str,
    graphs: list[dict[str, Any]],
    rate: float,
    seconds: float,
) -> list[float]:
    """Send requests open loop at ``rate`` per second; return each latency in milliseconds."""
    count = int(rate * seconds)
    latencies: list[float] = []
    started = time.perf_counter()

    async def one(index: int) -> None:
        request_id = f"online-{uuid.uuid4().hex[:12]}"
        payload = json.dumps(datasets.mutag_request(graphs[index % len(graphs)], request_id)).encode()
        reply = waiter.expect(request_id)
        sent = time.perf_counter()
        await producer.send_and_wait(topic, payload, key=request_id.encode())
        replied, _ = await asyncio.wait_for(reply, timeout=120)
        latencies.append((replied - sent) * 1000)

    tasks = []
    for index in range(count):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    return latencies


async def stored_and_published(database_url: str, dataset: str) -> tuple[int, int]:
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow(
            "SELECT run_id, published FROM replay_runs WHERE dataset = $1 ORDER BY started_at DESC LIMIT 1",
            dataset,
        )
        if row is None:
            return 0, 0
        stored = await connection.fetchval(
            "SELECT count(*) FROM inference_requests WHERE replay_run_id = $1", row["run_id"]
        )
        return int(stored), int(row["published"])
    finally:
        await connection.close()


async def wait_until_stored(database_url: str, dataset: str, at_least: int) -> None:
    while True:
        stored, _ = await stored_and_published(database_url, dataset)
        if stored >= at_least:
            return
        await asyncio.sleep(0.2)


async def wait_until_drained(database_url: str, dataset: str) -> None:
    """Wait until the worker has stored every record the paused publisher sent."""
    while True:
        stored, published = await stored_and_published(database_url, dataset)
        # published is the publisher's last heartbeat value and may lag, so
        # the count must also stay still for a second.
        if stored >= published:
            await asyncio.sleep(1.0)
            stored_again, _ = await stored_and_published(database_url, dataset)
            if stored_again == stored:
                return
        await asyncio.sleep(0.2)


async def replay_rate(database_url: str, dataset: str, seconds: float) -> float:
    """Return the records per second the worker stores for the replay of ``dataset`` over ``seconds``."""
    before, _ = await stored_and_published(database_url, dataset)
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    after, _ = await stored_and_published(database_url, dataset)
    return (after - before) / (time.perf_counter() - started)


def summarize(name: str, latencies: list[float]) -> str:
    values = np.asarray(latencies)
    return (
        f"  {name:<16}{len(values):>6}{np.percentile(values, 50):>10.1f}{np.percentile(values, 99):>10.1f}"
        f"{values.max():>10.1f}"
    )


async def run(options: argparse.Namespace) -> None:
    server_url = os.environ.get("GRAPHINFER_DATABASE_URL", DEFAULT_DATABASE_URL)
    database_name = f"graphinfer_bench_replay_{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="graphinfer-bench-"))
    broker = EmbeddedBroker().start()
    worker: subprocess.Popen[bytes] | None = None
    replay: asyncio.subprocess.Process | None = None
    database_url = await ensure_database(server_url, database_name)
    try:
        # 1. Models, the data set, a worker.
        repository = options.repository.resolve()
        if not any(repository.glob("*/*/manifest.json")):
            from graphinfer.models.training import train_demo

            print(f"training the demo models into {repository}", flush=True)
            await asyncio.to_thread(train_demo, repository, seed=0)
        graphs = mutag_replay_records()
        records = [
            {**graphs[index % len(graphs)], "id": f"bench-{index}"} for index in range(options.records)
        ]
        dataset = write_jsonl(work / "replay.jsonl.gz", records)
        environment = {
            **{key: value for key, value in os.environ.items() if not key.startswith("GRAPHINFER_")},
            "GRAPHINFER_APP_ID": f"bench-{os.getpid()}",
            "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "GRAPHINFER_DATABASE_URL": database_url,
            "GRAPHINFER_MODEL_REPOSITORY": str(repository),
            "GRAPHINFER_REPLAY_WINDOW": str(options.window),
            "GRAPHINFER_REPLAY_SHARE": str(options.share),
            "GRAPHINFER_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            database_url=database_url,
            model_repository=repository,
        )
        from graphinfer.streams.runner import preflight

        await preflight(settings)
        worker = start_worker(environment, work / "worker.log")
        _, held_out = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)

        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=0)
        waiter = ReplyWaiter(broker.bootstrap_servers, settings.prediction_topic)
        await producer.start()
        await waiter.start()
        try:
            # 2. Warm up, start the replay and measure its rate alone.
            await online_phase(producer, waiter, settings.request_topic, held_out, rate=10, seconds=5)
            replay = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "graphinfer", "replay", "--now", "--dataset", str(dataset)],
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
            dataset_key = str(dataset.absolute())
            await wait_until_stored(database_url, dataset_key, at_least=options.window)
            alone_rate = await replay_rate(database_url, dataset_key, seconds=10)

            # 3. Alternate idle and replay phases, so that other load on the
            #    machine falls on both. Idle: the publisher is stopped
            #    (SIGSTOP) and the worker has stored everything it published.
            idle: list[float] = []
            during: list[float] = []
            cycles: list[tuple[float, float]] = []
            worker_rss: list[float] = []
            shared_rates: list[float] = []
            load = [os.getloadavg()[0]]
            for _ in range(options.cycles):
                replay.send_signal(signal.SIGSTOP)
                await wait_until_drained(database_url, dataset_key)
                idle_phase = await online_phase(
                    producer, waiter, settings.request_topic, held_out, options.rate, options.seconds
                )
                replay.send_signal(signal.SIGCONT)
                stored, _ = await stored_and_published(database_url, dataset_key)
                await wait_until_stored(database_url, dataset_key, at_least=stored + options.window // 2)
                stored_before, _ = await stored_and_published(database_url, dataset_key)
                phase_started = time.perf_counter()
                during_phase = await online_phase(
                    producer, waiter, settings.request_topic, held_out, options.rate, options.seconds
                )
                stored_after, _ = await stored_and_published(database_url, dataset_key)
                shared_rates.append((stored_after - stored_before) / (time.perf_counter() - phase_started))
                worker_rss.append(rss_mb(worker.pid))
                idle += idle_phase
                during += during_phase
                cycles.append((float(np.percentile(idle_phase, 99)), float(np.percentile(during_phase, 99))))
            load.append(os.getloadavg()[0])
        finally:
            await waiter.stop()
            await producer.stop()

        # 4. The report.
        idle_p99 = float(np.percentile(idle, 99))
        during_p99 = float(np.percentile(during, 99))
        print("graphinfer replay isolation benchmark (benchmarks/replay_isolation.py)")
        print(f"  machine         {machine()}")
        print(
            f"  load average    {load[0]:.1f} at the first cycle, {load[1]:.1f} after the last (1 minute, whole machine)"
        )
        print(
            f"  worker          GRAPHINFER_POOL_PROCESSES={settings.pool_processes}, batches of "
            f"{settings.batch_max_size} online and {settings.replay_batch_max_size} replayed, "
            f"GRAPHINFER_REPLAY_WINDOW={options.window}, GRAPHINFER_REPLAY_SHARE={options.share:g}"
        )
        print(
            f"  online load     {options.rate:g} MUTAG requests/s, open loop, {options.cycles} cycles of "
            f"{options.seconds:g} s idle and {options.seconds:g} s during the replay (publish to reply on predictions)"
        )
        print(f"  {'phase':<16}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
        print(summarize("idle", idle))
        print(summarize("during replay", during))
        print(f"  p99 ratio       {during_p99 / idle_p99:.2f} (during replay / idle)")
        print("  p99 per cycle   " + ", ".join(f"{before:.0f} / {after:.0f} ms" for before, after in cycles))
        print(
            f"  replay          {options.records} records; {alone_rate:.0f} records/s alone, "
            f"{np.mean(shared_rates):.0f} records/s beside the online load"
        )
        print(f"  worker RSS      at most {max(worker_rss):.0f} MB during the replay")
    finally:
        if replay is not None and replay.returncode is None:
            replay.send_signal(signal.SIGCONT)
            replay.terminate()
            await asyncio.wait_for(replay.wait(), timeout=30)
        if worker is not None:
            stop_worker(worker)
        broker.stop()
        await drop_database(server_url, database_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000, help="graphs in the replayed data set")
    parser.add_argument("--rate", type=float, default=20.0, help="online requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each online phase")
    parser.add_argument("--cycles", type=int, default=3, help="idle and replay phase pairs")
    parser.add_argument("--window", type=int, default=1_000, help="GRAPHINFER_REPLAY_WINDOW")
    parser.add_argument("--share", type=float, default=0.25, help="GRAPHINFER_REPLAY_SHARE")
    parser.add_argument("--repository", type=Path, default=Path("model-repo"), help="model repository")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
