"""``graphinfer replay``: start, resume and list replay runs.

``--now`` and ``--resume`` publish from this process: it owns the run and
heartbeats while it publishes, so if it dies the replay leader of the
workers resumes the run once the heartbeat is older than
``GRAPHINFER_REPLAY_STALE_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from graphinfer.broker import ensure_topics
from graphinfer.errors import ConfigurationError
from graphinfer.progress import ProgressDisplay, open_progress
from graphinfer.replay.coordinator import dataset_spec, publish_options
from graphinfer.replay.ids import make_run_id
from graphinfer.replay.publisher import RunLostError, RunPublisher
from graphinfer.replay.report import (
    accuracy_by_model,
    format_runs,
    format_summary,
    progress_detail,
    read_labels,
)
from graphinfer.replay.sources import DatasetError, DatasetReader, DatasetSpec
from graphinfer.settings import Settings
from graphinfer.storage.db import Database
from graphinfer.storage.replay import NewRun, ReplayRun, ReplayStore

PROGRESS_POLL_S = 1.0


class ReplayCommandError(Exception):
    """The command cannot go on; its message gives the reason and the next step."""


def cli_owner() -> str:
    return f"cli@{socket.gethostname()}:{os.getpid()}"


async def _connect(settings: Settings) -> Database:
    return await Database.connect(
        settings.dsn, min_size=1, max_size=4, timeout_s=settings.database_connect_timeout_s
    )


async def list_runs(settings: Settings, limit: int) -> str:
    database = await _connect(settings)
    try:
        store = ReplayStore(database.pool)
        rows = []
        for run in await store.runs(limit):
            counts = await store.counts(run.run_id)
            rows.append((run, counts))
        return format_runs(rows)
    finally:
        await database.close()


async def start_run(settings: Settings, spec: DatasetSpec, *, wait: bool) -> int:
    """Create a manual run of ``spec`` and publish it; return the exit code."""
    await prepare_topics(settings)
    database = await _connect(settings)
    try:
        store = ReplayStore(database.pool)
        reader = DatasetReader(spec, settings.dsn)
        try:
            summary = await reader.summary()
        except DatasetError as exc:
            raise ReplayCommandError(str(exc)) from None
        tick = datetime.now(UTC).replace(microsecond=0)
        new = NewRun(
            run_id=make_run_id("manual", tick, summary.content_hash),
            tick=tick,
            trigger="manual",
            dataset=spec.stored_form(),
            dataset_hash=summary.content_hash,
            total=summary.total,
        )
        run = await store.create_running(new, cli_owner())
        if run is None:
            raise ReplayCommandError(
                f"replay run {new.run_id} exists already (the same data set started within the same second); "
                "graphinfer replay --list shows it"
            )
        print(f"replay run {run.run_id}: {summary.total} records from {spec}", flush=True)
        return await _publish(settings, store, run, wait=wait)
    finally:
        await database.close()


async def resume_run(settings: Settings, run_id: str, *, wait: bool) -> int:
    """Take over a stopped run and publish the rest of it; return the exit code."""
    await prepare_topics(settings)
    database = await _connect(settings)
    try:
        store = ReplayStore(database.pool)
        run = await store.claim(run_id, cli_owner(), settings.replay_stale_s)
        if run is None:
            return await _explain_unclaimable(settings, store, run_id, wait=wait)
        print(
            f"replay run {run.run_id} resumed: attempt {run.attempts}, {run.published} published before",
            flush=True,
        )
        return await _publish(settings, store, run, wait=wait)
    finally:
        await database.close()


async def _explain_unclaimable(settings: Settings, store: ReplayStore, run_id: str, *, wait: bool) -> int:
    run = await store.run(run_id)
    if run is None:
        raise ReplayCommandError(f"no replay run {run_id!r}; graphinfer replay --list shows the runs")
    if run.status == "finished":
        await _print_summary(settings, store, run, elapsed_s=None, with_accuracy=wait)
        return 0
    if run.status == "superseded":
        raise ReplayCommandError(
            f"replay run {run_id} was superseded by {run.superseded_by} because its data set changed; "
            "resume that run instead"
        )
    age = (datetime.now(UTC) - run.heartbeat_at).total_seconds()
    raise ReplayCommandError(
        f"replay run {run_id} is being published by {run.owner} (last heartbeat {age:.0f} s ago); it can be "
        f"resumed once its heartbeat is older than {settings.replay_stale_s:g} s (GRAPHINFER_REPLAY_STALE_S)"
    )


async def _publish(settings: Settings, store: ReplayStore, run: ReplayRun, *, wait: bool) -> int:
    owner = cli_owner()
    done_before, _ = await _progress(store, run.run_id)
    producer = AIOKafkaProducer(
        **settings.kafka_client_options(),
        client_id=f"{settings.app_id}-replay-cli",
        acks="all",
        linger_ms=5,
        max_request_size=max(1_048_576, settings.max_message_bytes + 65_536),
    )
    try:
        await asyncio.wait_for(producer.start(), timeout=settings.database_connect_timeout_s + 10)
    except (KafkaError, OSError, TimeoutError) as exc:
        await store.interrupt(run.run_id, owner)
        raise ConfigurationError(
            f"no Kafka broker responded at {settings.kafka_bootstrap_servers} "
            f"(GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS): {exc!r}; start the broker or fix the setting"
        ) from None

    async def send(topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> Awaitable[Any]:
        return await producer.send(topic, value, key=key, headers=headers)

    publisher = RunPublisher(store, send, publish_options(settings), owner, database_url=settings.dsn)
    progress = open_progress("replay", run.total or 0, unit="records", initial=done_before)
    watcher = asyncio.create_task(_watch(store, publisher, run.run_id, progress))
    started = time.monotonic()
    current = asyncio.current_task()
    assert current is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, current.cancel)
    try:
        final = await publisher.execute(run, wait=wait)
    except asyncio.CancelledError:
        await asyncio.shield(publisher.give_up(interrupted=True))
        progress.close()
        print(
            f"replay run {publisher.run_id} stopped; graphinfer replay --resume {publisher.run_id} continues it",
            file=sys.stderr,
        )
        raise
    except RunLostError as exc:
        progress.close()
        raise ReplayCommandError(str(exc)) from None
    except Exception:
        progress.close()
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await producer.stop()
    progress.update_to(*await _progress(store, final.run_id))
    progress.close()

    if not wait:
        print(
            f"replay run {final.run_id}: every record published; the replay leader finishes the run when "
            f"the last results are stored (graphinfer replay --list shows it)"
        )
        return 0
    await _print_summary(settings, store, final, elapsed_s=time.monotonic() - started, with_accuracy=True)
    return 0 if final.status == "finished" else 1


async def _watch(store: ReplayStore, publisher: RunPublisher, run_id: str, progress: ProgressDisplay) -> None:
    while True:
        await asyncio.sleep(PROGRESS_POLL_S)
        progress.update_to(*await _progress(store, publisher.run_id or run_id))


async def _progress(store: ReplayStore, run_id: str) -> tuple[int, str]:
    counts = await store.counts(run_id)
    return counts.done, progress_detail(counts)


async def _print_summary(
    settings: Settings, store: ReplayStore, run: ReplayRun, *, elapsed_s: float | None, with_accuracy: bool
) -> None:
    counts = await store.counts(run.run_id)
    accuracies = []
    if with_accuracy and run.status == "finished":
        try:
            labels = await read_labels(
                DatasetReader(DatasetSpec.parse(run.dataset), settings.dsn), run.run_id
            )
        except DatasetError as exc:
            print(f"accuracy not computed: {exc}", file=sys.stderr)
            labels = {}
        if labels:
            accuracies = accuracy_by_model(labels, await store.outcomes(run.run_id))
    errors = await store.record_error_list(run.run_id)
    print(format_summary(run, counts, elapsed_s, accuracies, errors), flush=True)


async def prepare_topics(settings: Settings) -> None:
    """Create the replay topic when missing; fails fast naming the broker setting."""
    await ensure_topics(settings, {settings.replay_topic: settings.replay_partitions})


def resolve_dataset(settings: Settings, dataset: Path | None, query: str | None) -> DatasetSpec:
    """Return the data set named on the command line, or else the configured one."""
    if dataset is not None and query:
        raise ReplayCommandError("pass --dataset or --query, not both")
    try:
        if dataset is not None:
            return DatasetSpec.from_path(dataset)
        if query:
            return DatasetSpec.from_query(query)
    except DatasetError as exc:
        raise ReplayCommandError(str(exc)) from None
    spec = dataset_spec(settings)
    if spec is None:
        raise ReplayCommandError(
            "no data set to replay: pass --dataset PATH or --query SQL, or set GRAPHINFER_REPLAY_DATASET "
            "or GRAPHINFER_REPLAY_DATASET_QUERY"
        )
    return spec


def run_command(
    settings: Settings,
    *,
    action: str,
    spec: DatasetSpec | None = None,
    run_id: str | None = None,
    wait: bool = False,
    limit: int = 20,
    with_worker: bool = False,
) -> int:
    """Run one ``graphinfer replay`` action; return the exit code.

    ``with_worker`` starts a worker process beside the command (for
    ``--embedded``) and stops it afterwards.
    """
    if action == "list":
        print(asyncio.run(list_runs(settings, limit)))
        return 0

    async def main() -> int:
        if action == "now":
            assert spec is not None
            return await start_run(settings, spec, wait=wait)
        assert run_id is not None
        return await resume_run(settings, run_id, wait=wait)

    with contextlib.ExitStack() as stack:
        if with_worker:
            stack.enter_context(_worker_beside(settings))
        try:
            return asyncio.run(main())
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        except asyncio.CancelledError:
            # Only the SIGTERM handler of _publish cancels the main task.
            return 128 + signal.SIGTERM


@contextlib.contextmanager
def _worker_beside(settings: Settings) -> Iterator[None]:
    from graphinfer.demo import start_worker, stop_worker
    from graphinfer.embedded import STATE_DIR
    from graphinfer.streams.runner import preflight

    if not any(Path(settings.model_repository).glob("*/*/manifest.json")):
        print(
            f"warning: {settings.model_repository} holds no model (GRAPHINFER_MODEL_REPOSITORY); every record "
            "will be rejected; graphinfer models train-demo writes the demo models",
            file=sys.stderr,
        )
    asyncio.run(preflight(settings))
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log_path = STATE_DIR / f"replay-worker-{os.getpid()}.log"
    worker = start_worker(dict(os.environ), log_path)
    print(f"worker started (pid {worker.pid}, log {log_path})", flush=True)
    try:
        yield
    finally:
        stop_worker(worker)
