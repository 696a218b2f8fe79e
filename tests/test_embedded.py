"""The embedded services: a private PostgreSQL cluster, and clean-up after a crash."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import asyncpg
import pytest

from graphinfer.embedded import STATE_DIR, EmbeddedStack, PrivateCluster, clean_stale, free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_private_cluster_starts_and_stops() -> None:
    cluster = PrivateCluster().start()
    try:
        assert cluster.data_dir is not None
        data_dir = cluster.data_dir

        async def server_version() -> str:
            connection = await asyncpg.connect(cluster.url)
            try:
                return await connection.fetchval("SHOW server_version")
            finally:
                await connection.close()

        assert asyncio.run(server_version())
    finally:
        cluster.stop()
    assert not port_open(cluster.port)
    assert not data_dir.exists()


def test_stack_falls_back_to_private_cluster() -> None:
    unused = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    stack = EmbeddedStack(database_name="graphinfer_fallback", server_url=unused)
    asyncio.run(stack.start())
    try:
        assert stack.cluster is not None
        assert stack.database_url.endswith("/graphinfer_fallback")
        assert port_open(stack.broker.port)
    finally:
        stack.stop()
    assert not port_open(stack.broker.port)
    assert not port_open(stack.cluster.port if stack.cluster else 0)


STARTER = """
import asyncio, sys, time
from graphinfer.embedded import EmbeddedBroker
broker = EmbeddedBroker().start()
print(broker.port, flush=True)
time.sleep(600)
"""


def test_broker_of_killed_owner_goes_away() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", STARTER],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    try:
        assert owner.stdout is not None
        port = int(owner.stdout.readline())
        assert port_open(port)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)

        # The broker dies with its owner, and the next start clears the record.
        deadline = time.monotonic() + 10
        while port_open(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not port_open(port)
        clean_stale()
        assert not [path for path in STATE_DIR.glob("broker-*.json") if f"-{owner.pid}-" in path.name]
    finally:
        if owner.poll() is None:
            owner.kill()


def test_stale_record_of_live_broker_is_stopped(tmp_path) -> None:
    from graphinfer.embedded import EmbeddedBroker

    broker = EmbeddedBroker().start()
    try:
        assert broker.record_path is not None
        # Rewrite the record as if its owner had died without cleaning up.
        record = broker.record_path.read_text().replace(f'"owner": {os.getpid()}', '"owner": 999999999')
        broker.record_path.write_text(record)
        clean_stale()
        deadline = time.monotonic() + 10
        while port_open(broker.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not port_open(broker.port)
        assert not broker.record_path.exists()
    finally:
        broker.stop()
