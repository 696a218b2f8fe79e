"""The process pool that runs feature extraction and models off the event loop.

Each pool process loads every served model once, from bytes that passed the
checksum checks, with BLAS limited to one thread so processes do not fight
over cores. A call that exceeds its time budget, or a process that dies
(for example out of memory), fails only the requests in that call: the pool
is replaced and the worker goes on.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Job:
    """One valid request for the pool: its raw bytes and the models to run on it."""

    raw: bytes
    model_refs: tuple[str, ...]


# State of a pool process, set once by _initialise.
_estimators: dict[str, Any] = {}
_manifests: dict[str, Manifest] = {}
_limits = Limits()


def _initialise(entries: Sequence[ModelEntry], trusted: frozenset[str], limits: Limits) -> None:
    from threadpoolctl import threadpool_limits

    global _limits
    threadpool_limits(1)
    _limits = limits
    for entry in entries:
        _manifests[entry.ref] = entry.manifest
        try:
            _estimators[entry.ref] = load_estimator(entry, trusted)
        except ModelRefused as exc:
            logging.getLogger(__name__).error(
                "model refused in pool process model=%s reason=%s", entry.ref, exc
            )


def _run(jobs: Sequence[Job]) -> list[list[dict[str, Any]]]:
    decoded = [decode_request(job.raw, _limits, require_id=False) for job in jobs]
    return engine.run_batch(decoded, [job.model_refs for job in jobs], _estimators, _manifests)


class InferencePool:
    """Runs batches of jobs in worker processes, with a time budget per call."""

    def __init__(
        self,
        entries: Sequence[ModelEntry],
        *,
        processes: int,
        timeout_s: float,
        trusted_sha256: frozenset[str] = frozenset(),
        limits: Limits | None = None,
    ) -> None:
        self._entries = list(entries)
        self._manifests = {entry.ref: entry.manifest for entry in entries}
        self._processes = processes
        self._timeout_s = timeout_s
        self._trusted = trusted_sha256
        self._limits = limits or Limits()
        self._executor: ProcessPoolExecutor | None = None
        self.restarts = 0

    def start(self) -> None:
        for variable in _BLAS_THREAD_VARIABLES:
            os.environ.setdefault(variable, "1")
        self._executor = ProcessPoolExecutor(
            max_workers=self._processes,
            # spawn, not fork: the worker process runs the Kafka client's
            # threads, and forking a process with threads can deadlock.
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_initialise,
            initargs=(self._entries, self._trusted, self._limits),
        )

    async def warm_up(self) -> None:
        """Start every pool process and load the models before traffic arrives."""
        await asyncio.gather(*(self._submit([]) for _ in range(self._processes)))

    def stop(self) -> None:
        if self._executor is not None:
            self._kill()

    async def run(self, jobs: Sequence[Job], *, background: bool = False) -> list[list[dict[str, Any]]]:
        """Run jobs split across the processes; return results per job, in order.

        A ``background`` call splits its jobs over all processes but one. With
        one background call at a time (the replay agent processes one batch
        at a time), a call made meanwhile without it finds a free process.
        """
        if not jobs:
            return []
        parts = self._processes - 1 if background and self._processes > 1 else self._processes
        chunks = _split(list(jobs), parts)
        answers = await asyncio.gather(*(self._run_chunk(chunk) for chunk in chunks))
        return [result for answer in answers for result in answer]

    async def _run_chunk(self, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        try:
            return await asyncio.wait_for(self._submit(jobs), timeout=self._timeout_s)
        except TimeoutError:
            logger.warning("inference call timed out after %.1f s; replacing the pool", self._timeout_s)
            self._replace()
            return self._failed(
                jobs, "model_timeout", f"took longer than {self._timeout_s} s (GRAPHINFER_MODEL_TIMEOUT_S)"
            )
        except BrokenProcessPool:
            logger.warning("an inference process died; replacing the pool")
            self._replace()
            return self._failed(
                jobs,
                "model_out_of_memory",
                "the inference process died during the call (out of memory or killed)",
            )

    def _submit(self, jobs: list[Job]) -> asyncio.Future[list[list[dict[str, Any]]]]:
        if self._executor is None:
            raise RuntimeError("InferencePool.start() was not called")
        return asyncio.get_running_loop().run_in_executor(self._executor, _run, jobs)

    def _failed(self, jobs: list[Job], code: str, reason: str) -> list[list[dict[str, Any]]]:
        return [
            [engine.error_result(self._manifests[ref], code, f"{ref} {reason}") for ref in job.model_refs]
            for job in jobs
        ]

    def _replace(self) -> None:
        self._kill()
        self.restarts += 1
        self.start()

    def _kill(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # NOTE: ProcessPoolExecutor cannot cancel a running call, so a hung or
        # runaway process is terminated directly before the executor shuts down.
        for process in list(getattr(executor, "_processes", {}).values()):
            if process.is_alive():
                process.terminate()
        executor.shutdown(wait=False, cancel_futures=True)


def _split(jobs: list[Job], parts: int) -> list[list[Job]]:
    parts = max(1, min(parts, len(jobs)))
    size, extra = divmod(len(jobs), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(jobs[start:end])
        start = end
    return chunks
