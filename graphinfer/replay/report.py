"""Output of ``graphinfer replay``: progress detail, a run's counts and accuracy, and the runs table."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from graphinfer.replay.ids import make_request_id
from graphinfer.replay.sources import DatasetReader
from graphinfer.storage.replay import ModelOutcome, RecordError, ReplayRun, RunCounts


def progress_detail(counts: RunCounts) -> str:
    """Format the outcome counts shown beside a run's progress."""
    return f"{counts.completed} completed, {counts.rejected} rejected, {counts.failed} failed"


@dataclass(frozen=True)
class Accuracy:
    """One model's accuracy against the data set's labels."""

    model: str
    correct: int
    scored: int

    @property
    def value(self) -> float:
        return self.correct / self.scored if self.scored else 0.0


async def read_labels(reader: DatasetReader, run_id: str) -> dict[str, Any]:
    """Map each labelled record's request id to its label, reading the data set again."""
    labels: dict[str, Any] = {}
    async for batch in reader.batches(500):
        for record in batch:
            if record.error is None and record.label is not None:
                labels[make_request_id(run_id, record.key)] = record.label
    return labels


def accuracy_by_model(labels: dict[str, Any], outcomes: Iterable[ModelOutcome]) -> list[Accuracy]:
    """Compare each model's predicted labels with the data set's labels.

    A string label is compared with a graph output's ``label``; an object of
    node id to label with a node output's labels. Outputs of other kinds (a
    ``score``, edges) are not counted.
    """
    correct: dict[str, int] = defaultdict(int)
    scored: dict[str, int] = defaultdict(int)
    for outcome in outcomes:
        expected = labels.get(outcome.request_id)
        if expected is None:
            continue
        model = f"{outcome.model}@{outcome.version}"
        for predicted, truth in _label_pairs(expected, outcome.output or {}):
            scored[model] += 1
            correct[model] += predicted == truth
    return [Accuracy(model, correct[model], scored[model]) for model in sorted(scored)]


def _label_pairs(expected: Any, output: dict[str, Any]) -> list[tuple[str, str]]:
    if isinstance(expected, dict):
        return [
            (str(node.get("label")), str(expected[str(node.get("id"))]))
            for node in output.get("nodes") or []
            if str(node.get("id")) in expected
        ]
    if "label" in output:
        return [(str(output["label"]), str(expected))]
    return []


def format_summary(
    run: ReplayRun,
    counts: RunCounts,
    elapsed_s: float | None,
    accuracies: list[Accuracy],
    errors: list[RecordError],
) -> str:
    lines = [f"replay run {run.run_id} {run.status}"]
    lines.append(f"  data set        {run.dataset} ({run.total if run.total is not None else '?'} records)")
    lines.append(f"  published       {run.published}")
    lines.append(f"  completed       {counts.completed}  (ok or partial)")
    lines.append(f"  rejected        {counts.rejected}")
    lines.append(f"  failed          {counts.failed}  ({counts.unreadable} unreadable)")
    if elapsed_s:
        lines.append(f"  throughput      {counts.done / elapsed_s:.1f} records/s ({elapsed_s:.1f} s)")
    for accuracy in accuracies:
        lines.append(
            f"  accuracy        {accuracy.model}  {accuracy.value:.3f}  "
            f"({accuracy.correct} of {accuracy.scored} labelled predictions)"
        )
    if run.error:
        lines.append(f"  error           {run.error}")
    if run.superseded_by:
        lines.append(f"  superseded by   {run.superseded_by}")
    if errors:
        lines.append("unreadable records:")
        lines.extend(f"  {error.location}  {error.reason}" for error in errors)
        if counts.unreadable > len(errors):
            lines.append(f"  ... and {counts.unreadable - len(errors)} more (table replay_record_errors)")
    return "\n".join(lines)


def format_runs(rows: list[tuple[ReplayRun, RunCounts]]) -> str:
    if not rows:
        return "no replay runs yet"
    header = (
        f"{'run id':<42} {'trigger':<8} {'tick (UTC)':<20} {'status':<11} "
        f"{'records':>8} {'completed':>9} {'rejected':>8} {'failed':>6}  started (UTC)"
    )
    lines = [header]
    for run, counts in rows:
        lines.append(
            f"{run.run_id:<42} {run.trigger:<8} {_when(run.tick):<20} {run.status:<11} "
            f"{_count(run.total):>8} {counts.completed:>9} {counts.rejected:>8} {counts.failed:>6}  "
            f"{_when(run.started_at)}"
        )
    return "\n".join(lines)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)
