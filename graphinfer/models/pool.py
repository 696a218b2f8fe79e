"""The inference processes: features and models run here, off the event loop.

Each process loads every served model once, from bytes that passed the
checksum checks, limits BLAS to one thread and caps its address space. A
batch runs in two stages:

1. features: the requests are split across the processes, and each
   computes, per request, the rows of every model it runs, so an extractor
   runs once per graph and is shared by the models that ask for it;
2. models: each model gets one call with its rows stacked, and different
   models run in different processes at the same time.

Every call has a time budget. A process that overruns it is killed and
replaced, and only the results of that call fail (``model_timeout``); a
process that runs out of memory or dies fails its call with
``model_out_of_memory`` and is replaced the same way. The worker process
itself is never at risk.

The processes measure their own work (model loads, decoding, features,
model calls, peak memory) and send the figures back with every reply; the
worker adds them to its Prometheus registry (:func:`graphinfer.metrics.record_pool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from graphinfer import metrics
from graphinfer.models import engine
from graphinfer.models.decode import Limits, decode_request
from graphinfer.models.manifest import Manifest
from graphinfer.models.repository import ModelEntry, ModelRefused, load_estimator

logger = logging.getLogger(__name__)

_BLAS_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
_START_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Job:
    """One valid request for the pool: its raw bytes and the models to run on it."""

    raw: bytes
    model_refs: tuple[str, ...]


@dataclass(frozen=True)
class PoolOptions:
    processes: int
    timeout_s: float
    memory_limit_mb: int = 0
    trusted_sha256: frozenset[str] = frozenset()
    limits: Limits = field(default_factory=Limits)


class CallFailed(Exception):
    """A pool call did not return: it timed out, ran out of memory or its process died."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --- the pool process ------------------------------------------------------------


def _child_main(
    connection: Connection, entries: Sequence[ModelEntry], options: PoolOptions
) -> None:  # pragma: no cover - runs in the pool process
    from threadpoolctl import threadpool_limits

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threadpool_limits(1)
    estimators: dict[str, Any] = {}
    manifests = {entry.ref: entry.manifest for entry in entries}
    refused: dict[str, str] = {}
    observations: list[metrics.Observation] = []
    for entry in entries:
        started = time.perf_counter()
        try:
            estimators[entry.ref] = load_estimator(entry, options.trusted_sha256)
        except ModelRefused as exc:
            refused[entry.ref] = str(exc)
            observations.append(("model_failed", (entry.ref,), 1.0))
        else:
            observations.append(("model_loaded", (entry.ref,), time.perf_counter() - started))
    if options.memory_limit_mb > 0:
        limit = options.memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    observations.append(_max_rss())
    connection.send(("ready", sorted(estimators), refused, observations))

    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        observations = []
        try:
            if kind == "features":
                reply: tuple[Any, ...] = (
                    "ok",
                    _features(message[1], manifests, options.limits, observations),
                )
            elif kind == "predict":
                reply = ("ok", _predict(message[1], message[2], estimators, manifests, observations))
            else:
                reply = ("ok", None)
        except MemoryError as exc:
            connection.send(("oom", f"ran out of memory ({exc!r})", []))
            return
        except Exception as exc:
            reply = ("error", repr(exc))
        observations.append(_max_rss())
        connection.send((*reply, observations))


def _max_rss() -> metrics.Observation:  # pragma: no cover - runs in the pool process
    # VmHWM is this process's own peak. ru_maxrss is not: a spawned process
    # starts with the peak of the worker that forked it.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return ("max_rss_bytes", (), float(int(line.split()[1]) * 1024))
    except OSError:
        pass
    return ("max_rss_bytes", (), float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def _die_with_parent() -> None:  # pragma: no cover - runs in the pool process
    # Linux only: the kernel kills this process when the worker dies, even by
    # SIGKILL, so no inference process outlives its worker.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the worker died before the line above took effect


def _features(
    jobs: Sequence[Job],
    manifests: dict[str, Manifest],
    limits: Limits,
    observations: list[metrics.Observation],
) -> list[dict[str, engine.FeatureRows | dict[str, Any]]]:
    answers: list[dict[str, engine.FeatureRows | dict[str, Any]]] = []
    for job in jobs:
        started = time.perf_counter()
        decoded = decode_request(job.raw, limits, require_id=False)
        observations.append(("decode_seconds", (), time.perf_counter() - started))
        rows: dict[str, engine.FeatureRows | dict[str, Any]] = {}
        for ref in job.model_refs:
            try:
                computed = engine.compute_features(manifests[ref], decoded)
                observations.append(("feature_seconds", (ref,), computed.seconds))
                rows[ref] = computed
            except MemoryError:
                raise
            except Exception as exc:
                rows[ref] = engine.feature_error(manifests[ref], exc)
        answers.append(rows)
    return answers


def _predict(
    ref: str,
    matrices: Sequence[Any],
    estimators: dict[str, Any],
    manifests: dict[str, Manifest],
    observations: list[metrics.Observation],
) -> tuple[list[Any], float]:
    estimator = estimators.get(ref)
    if estimator is None:
        return ["is not loaded in the inference process"] * len(matrices), 0.0
    answers, seconds = engine.predict_stacked(estimator, manifests[ref], matrices)
    observations.append(("predict_seconds", (ref,), seconds))
    observations.append(("predict_rows", (ref,), float(sum(matrix.shape[0] for matrix in matrices))))
    return answers, seconds


class PoolProcess:
    """One inference process and the parent's end of its pipe."""

    def __init__(self, entries: Sequence[ModelEntry], options: PoolOptions, slot: int = 0) -> None:
        self.slot = slot
        # spawn, not fork: the worker process runs the Kafka client's threads,
        # and forking a process with threads can deadlock.
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(
            target=_child_main,
            args=(child_end, list(entries), options),
            name="graphinfer-inference",
            daemon=True,
        )
        self.process.start()
        child_end.close()
        self.loaded: list[str] = []
        self.refused: dict[str, str] = {}

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait_ready(self) -> None:
        if not self.connection.poll(_START_TIMEOUT_S):
            raise CallFailed(
                "model_failed", f"the inference process did not start within {_START_TIMEOUT_S:.0f} s"
            )
        try:
            _, self.loaded, self.refused, observations = self.connection.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            raise CallFailed(
                "model_failed",
                f"the inference process exited with code {self.process.exitcode} while starting",
            ) from None
        metrics.record_pool(observations, self.slot)

    def round_trip(self, message: tuple[Any, ...]) -> Any:
        try:
            self.connection.send(message)
            status, payload, observations = self.connection.recv()
        except (EOFError, OSError, BrokenPipeError):
            self.process.join(timeout=1)
            code = self.process.exitcode
            if code == -signal.SIGKILL:
                raise CallFailed(
                    "model_out_of_memory",
                    "the inference process was killed by SIGKILL, most often the kernel's out-of-memory killer",
                ) from None
            raise CallFailed("model_failed", f"the inference process died with exit code {code}") from None
        metrics.record_pool(observations, self.slot)
        if status == "oom":
            raise CallFailed("model_out_of_memory", str(payload))
        if status == "error":
            raise CallFailed("model_failed", f"the inference process raised {payload}")
        return payload

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.connection.close()


# --- the pool ----------------------------------------------------------------------


class InferencePool:
    """A fixed number of inference processes serving one set of model versions."""

    def __init__(self, entries: Sequence[ModelEntry], options: PoolOptions) -> None:
        self.entries = list(entries)
        self.manifests = {entry.ref: entry.manifest for entry in entries}
        self.options = options
        self.restarts = 0
        self.loaded: set[str] = set()
        self._idle: asyncio.Queue[PoolProcess] = asyncio.Queue()
        self._all: set[PoolProcess] = set()
        self._io = ThreadPoolExecutor(
            max_workers=options.processes * 2 + 2, thread_name_prefix="graphinfer-pool"
        )
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._closed = False

    async def start(self) -> set[str]:
        """Start the processes and load the models; return the refs every process loaded."""
        for variable in _BLAS_THREAD_VARIABLES:
            os.environ.setdefault(variable, "1")
        started = await asyncio.gather(*(self._spawn(slot) for slot in range(self.options.processes)))
        loaded = set.intersection(*(set(process.loaded) for process in started))
        for process in started:
            for ref, reason in process.refused.items():
                logger.error("model rejected in inference process model=%s reason=%s", ref, reason)
        self.loaded = loaded
        return loaded

    async def _spawn(self, slot: int) -> PoolProcess:
        loop = asyncio.get_running_loop()
        process = await loop.run_in_executor(self._io, PoolProcess, self.entries, self.options, slot)
        await loop.run_in_executor(self._io, process.wait_ready)
        self._all.add(process)
        self._idle.put_nowait(process)
        return process

    async def _replace(self, process: PoolProcess, reason: str) -> None:
        self._all.discard(process)
        await asyncio.get_running_loop().run_in_executor(self._io, process.kill)
        self.restarts += 1
        metrics.POOL_RESTARTS.labels(reason).inc()
        if self._closed:
            return
        try:
            await self._spawn(process.slot)
        except CallFailed as exc:
            logger.error("an inference process could not be restarted: %s", exc)

    async def _call(self, message: tuple[Any, ...]) -> Any:
        process = await self._take_idle()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._io, process.round_trip, message)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout=self.options.timeout_s)
        except TimeoutError:
            # The thread still waiting on the pipe ends with an error once the
            # process is killed; consume that error so it is not reported.
            future.add_done_callback(lambda done: done.exception())
            logger.warning(
                "inference call timed out after %.1f s; replacing process pid=%s",
                self.options.timeout_s,
                process.pid,
            )
            await self._replace(process, "timeout")
            raise CallFailed(
                "model_timeout", f"took longer than {self.options.timeout_s} s (GRAPHINFER_MODEL_TIMEOUT_S)"
            ) from None
        except CallFailed as exc:
            if exc.code in ("model_out_of_memory",) or not process.process.is_alive():
                logger.warning(
                    "inference process failed; replacing pid=%s reason=%s", process.pid, exc.reason
                )
                await self._replace(process, "out_of_memory" if exc.code == "model_out_of_memory" else "died")
            else:
                self._idle.put_nowait(process)
            raise
        self._idle.put_nowait(process)
        return result

    async def _take_idle(self) -> PoolProcess:
        """Return an idle process, replacing those that died while idle (killed from outside, say)."""
        while True:
            process = await self._idle.get()
            if process.process.is_alive():
                return process
            logger.warning(
                "inference process died while idle; replacing pid=%s exit_code=%s",
                process.pid,
                process.process.exitcode,
            )
            await self._replace(process, "died")

    async def run(self, jobs: Sequence[Job], *, background: bool = False) -> list[list[dict[str, Any]]]:
        """Run the jobs; return each job's results in the order of its model refs.

        A ``background`` call computes features on all processes but one, so
        an online batch arriving meanwhile finds a free process; any other
        call splits its features across the processes idle when it starts.
        """
        if not jobs:
            return []
        self._in_flight += 1
        self._drained.clear()
        try:
            return await self._run(list(jobs), background)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._drained.set()

    async def _run(self, jobs: list[Job], background: bool = False) -> list[list[dict[str, Any]]]:
        # 1. Features, the jobs split across the processes. A background call
        #    leaves one process free. Any other call uses only the processes
        #    idle now, so it does not queue behind a background call.
        if background:
            parts = max(1, self.options.processes - 1)
        else:
            parts = max(1, self._idle.qsize())
        chunks = _split(list(range(len(jobs))), parts)
        answers = await asyncio.gather(
            *(self._call(("features", [jobs[index] for index in chunk])) for chunk in chunks),
            return_exceptions=True,
        )
        rows: list[dict[str, Any]] = [{} for _ in jobs]
        for chunk, answer in zip(chunks, answers, strict=True):
            for offset, index in enumerate(chunk):
                if isinstance(answer, CallFailed):
                    rows[index] = {
                        ref: engine.error_result(
                            self.manifests[ref],
                            answer.code,
                            f"{ref} failed while computing features: {answer.reason}",
                        )
                        for ref in jobs[index].model_refs
                    }
                elif isinstance(answer, BaseException):
                    raise answer
                else:
                    rows[index] = answer[offset]

        # 2. One stacked call per model, models in parallel.
        by_model: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            for ref in job.model_refs:
                if isinstance(rows[index][ref], engine.FeatureRows):
                    by_model.setdefault(ref, []).append(index)
        refs = list(by_model)
        predictions = await asyncio.gather(
            *(
                self._call(("predict", ref, [rows[index][ref].matrix for index in by_model[ref]]))
                for ref in refs
            ),
            return_exceptions=True,
        )

        # 3. Results in each job's model order.
        results: dict[tuple[int, str], dict[str, Any]] = {}
        for ref, prediction in zip(refs, predictions, strict=True):
            manifest = self.manifests[ref]
            for position, index in enumerate(by_model[ref]):
                if isinstance(prediction, CallFailed):
                    results[index, ref] = engine.error_result(
                        manifest, prediction.code, f"{ref} {prediction.reason}"
                    )
                elif isinstance(prediction, BaseException):
                    raise prediction
                else:
                    probabilities, seconds = prediction
                    results[index, ref] = engine.make_result(
                        manifest, rows[index][ref], probabilities[position], seconds
                    )
        return [
            [results.get((index, ref)) or rows[index][ref] for ref in job.model_refs]
            for index, job in enumerate(jobs)
        ]

    async def close(self, drain_timeout_s: float = 60.0) -> None:
        """Stop the processes once in-flight calls have finished (or the timeout passed)."""
        self._closed = True
        if self._in_flight:
            try:
                await asyncio.wait_for(self._drained.wait(), timeout=drain_timeout_s)
            except TimeoutError:
                logger.warning("closing the inference pool with %d batches still running", self._in_flight)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._io, process.kill) for process in list(self._all)))
        self._all.clear()
        self._io.shutdown(wait=False, cancel_futures=True)

    @property
    def pids(self) -> list[int]:
        return sorted(process.pid for process in self._all if process.pid is not None)


def _split(indexes: list[int], parts: int) -> list[list[int]]:
    parts = max(1, min(parts, len(indexes)))
    size, extra = divmod(len(indexes), parts)
    chunks, start = [], 0
    for position in range(parts):
        end = start + size + (1 if position < extra else 0)
        chunks.append(indexes[start:end])
        start = end
    return chunks
