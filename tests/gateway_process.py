"""Start `graphinfer gateway` processes for tests and read their metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from graphinfer.embedded import free_port
from tests.conftest import ROOT


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    environment: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """Return one sample of /metrics, 0 when the gateway has not exported it."""
        return _sample(httpx.get(f"{self.url}/metrics", timeout=5).text, name, labels)

    async def metric_async(self, name: str, **labels: str) -> float:
        """Read one sample of /metrics without blocking the event loop."""
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{self.url}/metrics")
        return _sample(response.text, name, labels)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the gateway exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the gateway was not ready within {timeout_s:.0f} s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=timeout_s)


def start_gateway(
    environment: dict[str, str], log_path: Path, *, ready: bool = True, timeout_s: float = 60.0
) -> GatewayProcess:
    """Start a gateway on a free port and wait until /readyz returns 200 (with ``ready``) or /healthz does."""
    port = free_port()
    environment = {**environment, "GRAPHINFER_GATEWAY_PORT": str(port), "PYTHONPATH": str(ROOT)}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "graphinfer", "gateway"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    gateway = GatewayProcess(process, f"http://127.0.0.1:{port}", log_path, environment)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{gateway.url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            gateway.stop(signal.SIGKILL)
            raise AssertionError(f"the gateway did not start:\n{gateway.log()[-3000:]}")
        time.sleep(0.1)
    if ready:
        try:
            gateway.wait_ready(max(1.0, deadline - time.monotonic()))
        except AssertionError:
            gateway.stop(signal.SIGKILL)
            raise
    return gateway


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
