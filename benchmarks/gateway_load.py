"""Open-loop load test of ``POST /v1/predict``.

Send times are fixed in advance at the offered rate, and each request's
latency runs from its intended send time. A slow gateway therefore cannot
slow the sender down and hide its own queueing (coordinated omission). The
generator runs in a process of its own with a minimal HTTP/1.1 client, so
it shares no event loop with the stack it measures and takes little CPU
from it.

Without ``--url`` the script starts what it measures: the embedded broker,
a database in the local PostgreSQL, one worker and one gateway replica. It
trains the demo models into ``--model-repository`` when it contains none.
Requests are the 38 MUTAG held-out graphs, cycled, each with a new
``request_id``.

    python benchmarks/gateway_load.py --rate 50,100,200 --duration 20
    python benchmarks/gateway_load.py --url http://127.0.0.1:8000 --api-key KEY --rate 100

Columns: offered rate, requests sent, 200 responses, 200s completed per
second (from the first intended send to the last completion), p50 and p99
latency of the 200s from their intended send time, CPU milliseconds per
request of the gateway process the script started, and other outcomes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
STACK_START_TIMEOUT_S = 180.0
_KEEP_ALIVE_REUSE_S = 4.0


@dataclass
class RunResult:
    """Measurements of the generator for one offered rate."""

    rate: float
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    first_intended: float = 0.0
    last_completed: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)


# --- the generator process ----------------------------------------------------------


def generate(
    url: str, api_key: str | None, bodies: list[bytes], rate: float, timeout_s: float, connections: int
) -> tuple[list[float], dict[str, int], float, float]:
    """Send ``bodies`` at ``rate`` per second on a fixed schedule; return the measurements."""
    return asyncio.run(_generate(url, api_key, bodies, rate, timeout_s, connections))


async def _generate(
    url: str, api_key: str | None, bodies: list[bytes], rate: float, timeout_s: float, connections: int
) -> tuple[list[float], dict[str, int], float, float]:
    pool = ConnectionPool(url, api_key, connections)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    completed_at = 0.0

    async def send(body: bytes, intended: float) -> None:
        nonlocal completed_at
        try:
            status = str(await asyncio.wait_for(pool.post("/v1/predict", body), timeout_s))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            status = type(exc).__name__
        finished = loop.time()
        completed_at = max(completed_at, finished)
        statuses[status] += 1
        if status == "200":
            latencies.append(finished - intended)

    start = loop.time() + 0.2
    tasks = []
    for index, body in enumerate(bodies):
        intended = start + index / rate
        delay = intended - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(body, intended)))
    await asyncio.gather(*tasks)
    pool.close()
    return latencies, dict(statuses), start, completed_at


class ConnectionPool:
    """A minimal HTTP/1.1 keep-alive client for JSON POSTs.

    A general client such as httpx spends a few milliseconds of CPU per
    request, which on a small machine takes CPU from the stack under test.
    This one handles only what the gateway sends back: a status line,
    headers and a body of ``Content-Length`` bytes.
    """

    def __init__(self, url: str, api_key: str | None, max_connections: int) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.authorization = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        self.idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(max_connections)

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # Reuse the most recently used connection the server has not closed. uvicorn
        # closes keep-alive connections idle for 5 s (its timeout_keep_alive default).
        now = time.monotonic()
        while self.idle:
            idle_since, reader, writer = self.idle.pop()
            if now - idle_since < _KEEP_ALIVE_REUSE_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> int:
        async with self.slots:
            reader, writer = await self._connection()
            try:
                writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
                    + self.authorization
                    + b"\r\n"
                    + body
                )
                status, keep_alive = await _read_response(reader)
            except BaseException:
                writer.close()
                raise
            if keep_alive:
                self.idle.append((time.monotonic(), reader, writer))
            else:
                writer.close()
            return status

    def close(self) -> None:
        for _, _, writer in self.idle:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split()[1])
    length = 0
    keep_alive = True
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep_alive = False
    await reader.readexactly(length)
    return status, keep_alive


def run_generator(
    url: str,
    api_key: str | None,
    bodies: list[bytes],
    rate: float,
    timeout_s: float,
    connections: int,
) -> RunResult:
    """Run :func:`generate` in a separate process and collect its result."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        latencies, statuses, first, last = pool.apply(
            generate, (url, api_key, bodies, rate, timeout_s, connections)
        )
    return RunResult(
        rate=rate,
        duration_s=len(bodies) / rate,
        latencies_s=latencies,
        statuses=Counter(statuses),
        first_intended=first,
        last_completed=last,
    )


# --- requests ------------------------------------------------------------------------


def build_bodies(count: int, run_id: str) -> list[bytes]:
    from graphinfer.models import datasets

    _, held_out = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    return [
        json.dumps(
            datasets.mutag_request(held_out[index % len(held_out)], f"{run_id}-{index}"),
            separators=(",", ":"),
        ).encode()
        for index in range(count)
    ]


# --- the stack under test --------------------------------------------------------------


class Stack:
    """The embedded broker and database, one worker and one gateway, started and stopped together."""

    def __init__(self, model_repository: Path, pool_processes: int, log_dir: Path) -> None:
        self.model_repository = model_repository
        self.pool_processes = pool_processes
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.url = ""
        self.embedded: Any = None

    def start(self) -> None:
        from graphinfer.embedded import EmbeddedStack, free_port
        from graphinfer.models.training import train_demo

        if not any(self.model_repository.glob("*/*/manifest.json")):
            print(f"training the demo models into {self.model_repository}", flush=True)
            train_demo(self.model_repository, seed=0)

        self.embedded = EmbeddedStack(database_name="graphinfer_bench")
        asyncio.run(self.embedded.start())
        port = free_port()
        environment = {
            **{key: value for key, value in os.environ.items() if not key.startswith("GRAPHINFER_")},
            **self.embedded.environment(),
            "GRAPHINFER_APP_ID": f"graphinfer-bench-{uuid.uuid4().hex[:8]}",
            "GRAPHINFER_MODEL_REPOSITORY": str(self.model_repository),
            "GRAPHINFER_POOL_PROCESSES": str(self.pool_processes),
            "GRAPHINFER_GATEWAY_PORT": str(port),
            "GRAPHINFER_GATEWAY_MAX_IN_FLIGHT": "4096",
            "GRAPHINFER_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
        }
        worker_log = self.log_dir / "worker.log"
        self.processes.append(_spawn(["worker"], environment, worker_log))
        _wait_for_log(self.processes[-1], worker_log, "worker started")
        self.processes.append(_spawn(["gateway"], environment, self.log_dir / "gateway.log"))
        self.url = f"http://127.0.0.1:{port}"

    @property
    def gateway_pid(self) -> int | None:
        return self.processes[1].pid if len(self.processes) > 1 else None

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.embedded is not None:
            self.embedded.stop()


def _spawn(arguments: list[str], environment: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "graphinfer", *arguments],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )


def _wait_for_log(process: subprocess.Popen[bytes], log_path: Path, text: str) -> None:
    deadline = time.monotonic() + STACK_START_TIMEOUT_S
    while text not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start; see {log_path}")
        time.sleep(0.2)


def wait_until_answering(url: str, api_key: str | None, timeout_s: float = STACK_START_TIMEOUT_S) -> None:
    """Send one request at a time until the gateway returns 200, which needs a worker in its group."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    body = build_bodies(1, f"warm-{uuid.uuid4().hex[:8]}")[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.post(
                f"{url}/v1/predict", content=body, headers=headers, params={"timeout_s": 10}, timeout=15
            )
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the gateway at {url} returned no 200 within {timeout_s:.0f} s")


# --- report ------------------------------------------------------------------------------


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, {cpu}, {cores} CPUs available, "
        f"Python {platform.python_version()}"
    )


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds of a process, read from /proc (Linux only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def report_line(result: RunResult, gateway_cpu_s: float | None) -> str:
    cpu = "-" if gateway_cpu_s is None else f"{gateway_cpu_s / max(result.sent, 1) * 1000:.2f}"
    others = {status: count for status, count in result.statuses.items() if status != "200"}
    if not result.latencies_s:
        return f"{result.rate:>9.0f} {result.sent:>7} {0:>7} {'-':>8} {'-':>8} {'-':>8} {cpu:>9}  {others}"
    elapsed = max(result.last_completed - result.first_intended, 1e-9)
    throughput = result.ok / elapsed
    p50 = percentile(result.latencies_s, 0.5) * 1000
    p99 = percentile(result.latencies_s, 0.99) * 1000
    return (
        f"{result.rate:>9.0f} {result.sent:>7} {result.ok:>7} {throughput:>8.1f} {p50:>8.1f} {p99:>8.1f} "
        f"{cpu:>9}  {others or ''}"
    )


# --- entry point ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="100", help="offered requests/s; a comma-separated list runs each")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per rate")
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of unmeasured load before each rate"
    )
    parser.add_argument("--url", help="a running gateway; without it the script starts the stack")
    parser.add_argument("--api-key", help="API key for a gateway with GRAPHINFER_API_KEYS set")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request in seconds")
    parser.add_argument(
        "--connections", type=int, default=512, help="most HTTP connections the generator opens"
    )
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model-repo")
    parser.add_argument(
        "--pool-processes", type=int, default=2, help="inference processes of the started worker"
    )
    arguments = parser.parse_args()
    rates = [float(rate) for rate in arguments.rate.split(",")]

    stack: Stack | None = None
    url = arguments.url
    try:
        if url is None:
            log_dir = Path(tempfile.mkdtemp(prefix="graphinfer-bench-"))
            stack = Stack(arguments.model_repository, arguments.pool_processes, log_dir)
            print(f"starting the embedded stack (logs in {log_dir})", flush=True)
            stack.start()
            url = stack.url
        wait_until_answering(url, arguments.api_key)

        print("graphinfer gateway load, open loop: POST /v1/predict, MUTAG held-out graphs")
        print(f"  machine   {machine_description()}")
        if stack is not None:
            print(
                f"  stack     embedded Tansu broker, local PostgreSQL, 1 worker "
                f"({arguments.pool_processes} inference processes), 1 gateway replica, all on this machine"
            )
        else:
            print(f"  gateway   {url}")
        print(f"  per rate  {arguments.warmup:g} s warm-up, then {arguments.duration:g} s measured")
        print(f"  load      {load_average()} (1, 5 and 15 min load average before the first rate)")
        header = ("offered/s", "sent", "200", "done/s", "p50 ms", "p99 ms", "gw cpu ms")
        print(" ".join(f"{name:>{width}}" for name, width in zip(header, (9, 7, 7, 8, 8, 8, 9), strict=True)))
        gateway_pid = stack.gateway_pid if stack is not None else None
        for rate in rates:
            run_id = uuid.uuid4().hex[:8]
            if arguments.warmup > 0:
                warmup = build_bodies(int(rate * arguments.warmup), f"warm-{run_id}")
                run_generator(url, arguments.api_key, warmup, rate, arguments.timeout, arguments.connections)
            bodies = build_bodies(int(rate * arguments.duration), f"load-{run_id}")
            cpu_before = cpu_seconds(gateway_pid) if gateway_pid is not None else 0.0
            result = run_generator(
                url, arguments.api_key, bodies, rate, arguments.timeout, arguments.connections
            )
            gateway_cpu = cpu_seconds(gateway_pid) - cpu_before if gateway_pid is not None else None
            print(report_line(result, gateway_cpu), flush=True)
        print(f"  load      {load_average()} after the last rate")
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    main()
