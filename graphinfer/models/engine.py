"""Model selection and batched inference.

Selection runs in the worker process and needs only manifests. Inference
runs in pool processes (:mod:`graphinfer.models.pool`): for a batch of
requests, every model's feature rows are stacked and the model is called
once; when that call fails, the requests are retried one by one so only the
culprit fails.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphinfer.errors import ErrorDetail, GraphinferError
from graphinfer.models import features
from graphinfer.models.decode import DecodedRequest
from graphinfer.models.graph import GraphInput
from graphinfer.models.manifest import Manifest
from graphinfer.models.repository import ModelCatalog, ModelEntry
from graphinfer.models.schema import PredictRequest


@dataclass
class Selection:
    """Models to run on one request, the models skipped, and the named models that do not fit."""

    run: list[ModelEntry] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def misfit_reason(manifest: Manifest, graph: GraphInput, task: str | None) -> str | None:
    """Return why the graph does not fit the model's input signature, or ``None``."""
    signature = manifest.input
    if task is not None and task != manifest.task:
        return f"serves task {manifest.task!r}, but the request asks for task {task!r}"
    if signature.directed is not None and signature.directed != graph.directed:
        wanted = "directed" if signature.directed else "undirected"
        given = "directed" if graph.directed else "undirected"
        return f"reads {wanted} graphs, but this graph is {given}"
    if signature.feature_dim is not None:
        if graph.feature_dim is None:
            return f"reads node features of dimension {signature.feature_dim}, which this graph's nodes lack"
        if graph.feature_dim != signature.feature_dim:
            return (
                f"reads node features of dimension {signature.feature_dim}, but this graph's "
                f"features have dimension {graph.feature_dim}"
            )
    for attribute in signature.node_attributes:
        missing = [node for node, data in graph.graph.nodes(data=True) if data.get(attribute) is None]
        if missing:
            return (
                f"reads node attribute {attribute!r}, which {len(missing)} of this graph's nodes lack "
                f"(first: {missing[0]!r})"
            )
    for attribute in signature.edge_attributes:
        lacking = [(u, v) for u, v, value in graph.graph.edges(data=attribute) if value is None]
        if lacking:
            return (
                f"reads edge attribute {attribute!r}, which {len(lacking)} of this graph's edges lack "
                f"(first: {lacking[0]!r})"
            )
    if graph.number_of_nodes == 0 and (
        manifest.task == "node" or signature.node_attributes or signature.feature_dim
    ):
        return "reads nodes, but this graph has none"
    return None


def select_models(
    request: PredictRequest,
    graph: GraphInput,
    catalog: ModelCatalog,
    default_models: Sequence[str] = (),
) -> Selection:
    """Choose the models for one request.

    Explicit ``models`` first, then the models of the requested task, then
    ``GRAPHINFER_DEFAULT_MODELS``, then every served model. In an implicit
    selection a model the graph does not fit is skipped; a named one that
    does not fit becomes an ``incompatible_input`` error result. Raises
    :class:`GraphinferError` with ``unknown_model`` or ``no_model_selected``.
    """
    selection = Selection()
    if request.models:
        for ref in dict.fromkeys(request.models):
            entry = catalog.resolve(ref)
            reason = misfit_reason(entry.manifest, graph, request.task)
            if reason is None:
                selection.run.append(entry)
            else:
                selection.errors.append(
                    error_result(
                        entry.manifest, "incompatible_input", f"{entry.ref} {reason}", field="models"
                    )
                )
        return selection

    if request.task is not None:
        candidates = [entry for entry in catalog.serving() if entry.manifest.task == request.task]
        origin = f"task {request.task!r}"
    elif default_models:
        candidates = [catalog.resolve(ref) for ref in default_models]
        origin = "GRAPHINFER_DEFAULT_MODELS"
    else:
        candidates = catalog.serving()
        origin = "the served models"

    for entry in candidates:
        reason = misfit_reason(entry.manifest, graph, request.task)
        if reason is None:
            selection.run.append(entry)
        else:
            selection.skipped.append(
                {
                    "model": entry.name,
                    "version": entry.version,
                    "code": "incompatible_input",
                    "message": reason,
                }
            )
    if not selection.run:
        raise NoModelSelected(
            _no_model_message(origin, request.task, candidates, selection, catalog), selection.skipped
        )
    return selection


class NoModelSelected(GraphinferError):
    """No served model fits the request; ``skipped`` gives the reason each candidate was left out."""

    code = "no_model_selected"

    def __init__(self, message: str, skipped: list[dict[str, Any]]) -> None:
        super().__init__(
            message,
            details=[
                ErrorDetail(f"models[{item['model']}@{item['version']}]", item["message"]) for item in skipped
            ],
        )
        self.skipped = skipped


def _no_model_message(
    origin: str, task: str | None, candidates: list[ModelEntry], selection: Selection, catalog: ModelCatalog
) -> str:
    if not candidates:
        served = sorted({f"{entry.ref} ({entry.manifest.task})" for entry in catalog.serving()})
        if task is not None:
            return (
                f"no served model handles task {task!r} (served: {', '.join(served) or 'none'}); "
                "send a task a served model handles, or deploy a model for this task"
            )
        return "no model is served; deploy a model into GRAPHINFER_MODEL_REPOSITORY"
    reasons = "; ".join(f"{item['model']}@{item['version']} {item['message']}" for item in selection.skipped)
    return (
        f"the graph fits none of the models selected by {origin}: {reasons}; change the graph "
        "to fit one of them, or name models explicitly"
    )


def error_result(manifest: Manifest, code: str, message: str, *, field: str | None = None) -> dict[str, Any]:
    details = [ErrorDetail(field, manifest.name).to_dict()] if field else []
    return {
        "model": manifest.name,
        "version": manifest.version,
        "task": manifest.task,
        "status": "error",
        "error": {"code": code, "message": message, "details": details},
    }


def node_targets(request: PredictRequest, graph: GraphInput) -> list[Any]:
    if request.targets is not None and request.targets.nodes is not None:
        return list(request.targets.nodes)
    return list(graph.node_ids)


def edge_targets(request: PredictRequest, graph: GraphInput) -> list[tuple[Any, Any]]:
    if request.targets is not None and request.targets.edges is not None:
        pairs = [(edge.source, edge.target) for edge in request.targets.edges]
    else:
        pairs = [(source, target) for source, target, *_ in graph.graph.edges]
    if not graph.directed:
        # Undirected pairs are canonicalised so (a, b) and (b, a) score once.
        pairs = [_canonical_pair(source, target) for source, target in pairs]
    return list(dict.fromkeys(pairs))


def _canonical_pair(source: Any, target: Any) -> tuple[Any, Any]:
    key = (type(source).__name__, str(source)), (type(target).__name__, str(target))
    return (source, target) if key[0] <= key[1] else (target, source)


@dataclass
class FeatureRows:
    """Feature rows of one request for one model, and the ids they score."""

    matrix: np.ndarray
    ids: list[Any]
    seconds: float


def compute_features(manifest: Manifest, item: DecodedRequest) -> FeatureRows:
    """Compute one model's feature rows for one request (memoised per graph)."""
    started = time.perf_counter()
    request, graph = item.request, item.graph
    ids: list[Any]
    if manifest.task == "node":
        ids = node_targets(request, graph)
        matrix = features.extract(manifest.features, graph, "node", ids)
    elif manifest.task == "edge":
        ids = edge_targets(request, graph)
        matrix = features.extract(manifest.features, graph, "edge", ids)
    else:
        ids = []
        matrix = features.extract(manifest.features, graph, "graph", None)
    return FeatureRows(
        matrix=np.ascontiguousarray(matrix, dtype=np.float64), ids=ids, seconds=time.perf_counter() - started
    )


def feature_error(manifest: Manifest, exc: Exception) -> dict[str, Any]:
    ref = f"{manifest.name}@{manifest.version}"
    if isinstance(exc, GraphinferError):
        return error_result(manifest, exc.code, f"{ref}: {exc.message}")
    return error_result(manifest, "model_failed", f"{ref} failed to compute features: {exc!r}")


def predict_stacked(
    estimator: Any, manifest: Manifest, matrices: Sequence[np.ndarray]
) -> tuple[list[np.ndarray | str], float]:
    """Call the model once on the stacked rows; on failure retry each request alone.

    Returns, per input matrix, its probabilities or the error text, and the
    seconds the stacked call took.
    """
    answers: list[np.ndarray | str] = [np.zeros((0, len(manifest.output.class_names)))] * len(matrices)
    present = [position for position, matrix in enumerate(matrices) if matrix.shape[0] > 0]
    if not present:
        return answers, 0.0
    started = time.perf_counter()
    try:
        stacked = _probabilities(estimator, np.vstack([matrices[position] for position in present]), manifest)
    except MemoryError:
        raise
    except Exception as exc:
        if len(present) == 1:
            answers[present[0]] = f"raised {exc!r}"
            return answers, time.perf_counter() - started
        # The stacked call failed: retry one request at a time to find the culprit.
        for position in present:
            try:
                answers[position] = _probabilities(estimator, matrices[position], manifest)
            except MemoryError:
                raise
            except Exception as single:
                answers[position] = f"raised {single!r}"
        return answers, time.perf_counter() - started
    offset = 0
    for position in present:
        count = matrices[position].shape[0]
        answers[position] = stacked[offset : offset + count]
        offset += count
    return answers, time.perf_counter() - started


def make_result(
    manifest: Manifest, rows: FeatureRows, answer: np.ndarray | str, call_seconds: float
) -> dict[str, Any]:
    """Turn one request's probabilities (or error text) into a v1 model result."""
    ref = f"{manifest.name}@{manifest.version}"
    if isinstance(answer, str):
        return error_result(manifest, "model_failed", f"{ref} {answer}")
    if not np.all(np.isfinite(answer)):
        return error_result(
            manifest, "model_failed", f"{ref} returned a non-finite probability (NaN or Infinity)"
        )
    return {
        "model": manifest.name,
        "version": manifest.version,
        "task": manifest.task,
        "status": "ok",
        "latency_ms": round((rows.seconds + call_seconds) * 1000.0, 3),
        "output": format_output(manifest, rows.ids, np.clip(answer, 0.0, 1.0)),
    }


def run_batch(
    decoded: Sequence[DecodedRequest],
    model_refs: Sequence[Sequence[str]],
    estimators: Mapping[str, Any],
    manifests: Mapping[str, Manifest],
) -> list[list[dict[str, Any]]]:
    """Run each request's models in this process, one stacked call per model.

    The worker runs the same stages split across pool processes
    (:mod:`graphinfer.models.pool`); this in-process form serves training
    code, benchmarks and tests.
    """
    results: list[list[dict[str, Any]]] = [[] for _ in decoded]
    by_model: dict[str, list[int]] = {}
    for position, refs in enumerate(model_refs):
        for ref in refs:
            by_model.setdefault(ref, []).append(position)

    for ref, positions in by_model.items():
        manifest = manifests[ref]
        estimator = estimators.get(ref)
        if estimator is None:
            for position in positions:
                results[position].append(
                    error_result(manifest, "model_failed", f"{ref} is not loaded in the inference process")
                )
            continue
        computed: list[tuple[int, FeatureRows]] = []
        for position in positions:
            try:
                computed.append((position, compute_features(manifest, decoded[position])))
            except Exception as exc:
                results[position].append(feature_error(manifest, exc))
        answers, call_seconds = predict_stacked(estimator, manifest, [rows.matrix for _, rows in computed])
        for (position, rows), answer in zip(computed, answers, strict=True):
            results[position].append(make_result(manifest, rows, answer, call_seconds))
    return results


def _probabilities(estimator: Any, matrix: np.ndarray, manifest: Manifest) -> np.ndarray:
    probabilities = np.asarray(estimator.predict_proba(matrix), dtype=np.float64)
    expected = (matrix.shape[0], len(manifest.output.class_names))
    if probabilities.shape != expected:
        raise ValueError(f"predict_proba returned shape {probabilities.shape}, expected {expected}")
    return probabilities


def format_output(manifest: Manifest, ids: Sequence[Any], probabilities: np.ndarray) -> dict[str, Any]:
    """Shape model output as the v1 contract defines it, with plain Python types only."""
    predictions = [_one_prediction(manifest, row) for row in probabilities]
    if manifest.task == "graph":
        return predictions[0]
    if manifest.task == "node":
        return {
            "nodes": [
                {"id": node_id, **prediction} for node_id, prediction in zip(ids, predictions, strict=True)
            ]
        }
    return {
        "edges": [
            {
                "source": source,
                "target": target,
                # A score model's prediction carries its score. For a class model, the score is the
                # positive class's probability.
                "score": prediction["score"] if "score" in prediction else _positive(manifest, prediction),
            }
            for (source, target), prediction in zip(ids, predictions, strict=True)
        ]
    }


def _one_prediction(manifest: Manifest, row: np.ndarray) -> dict[str, Any]:
    names = manifest.output.class_names
    if manifest.output.kind == "score":
        positive = manifest.output.positive_class or names[-1]
        return {"score": _clean(row[names.index(positive)])}
    best = int(np.argmax(row))
    return {
        "label": names[best],
        "probabilities": {name: _clean(value) for name, value in zip(names, row, strict=True)},
    }


def _positive(manifest: Manifest, prediction: dict[str, Any]) -> float:
    positive = manifest.output.positive_class or manifest.output.class_names[-1]
    return float(prediction["probabilities"][positive])


def _clean(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("non-finite probability")
    return round(number, 6)
