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
    """Which models run on one request, which were skipped, and explicit misfits."""

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
    if manifest.task == "node" and graph.number_of_nodes == 0:
        return "scores nodes, but this graph has none"
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
        considered = ", ".join(entry.ref for entry in candidates) or "none"
        raise GraphinferError(
            f"no model can answer this request: {origin} gave {considered}, and the graph fits none; "
            "name models explicitly, set task, or send a graph that fits a model's input signature",
            code="no_model_selected",
            details=[ErrorDetail("models", considered, "a model whose input signature fits the graph")],
        )
    return selection


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
class _Rows:
    """Feature rows of one request for one model, and where they go back."""

    position: int
    matrix: np.ndarray
    ids: list[Any]
    seconds: float


def run_batch(
    decoded: Sequence[DecodedRequest],
    model_refs: Sequence[Sequence[str]],
    estimators: Mapping[str, Any],
    manifests: Mapping[str, Manifest],
) -> list[list[dict[str, Any]]]:
    """Run each request's models, one stacked call per model; return results per request."""
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
        rows = []
        for position in positions:
            try:
                rows.append(_feature_rows(manifest, decoded[position]))
            except GraphinferError as exc:
                results[position].append(error_result(manifest, exc.code, f"{ref}: {exc.message}"))
            except Exception as exc:
                results[position].append(
                    error_result(manifest, "model_failed", f"{ref} failed to compute features: {exc!r}")
                )
            else:
                rows[-1].position = position
        for position, result in _predict(manifest, estimator, rows):
            results[position].append(result)
    return results


def _feature_rows(manifest: Manifest, item: DecodedRequest) -> _Rows:
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
    return _Rows(
        position=-1,
        matrix=np.asarray(matrix, dtype=np.float64),
        ids=ids,
        seconds=time.perf_counter() - started,
    )


def _predict(manifest: Manifest, estimator: Any, rows: list[_Rows]) -> list[tuple[int, dict[str, Any]]]:
    if not rows:
        return []
    non_empty = [row for row in rows if row.matrix.shape[0] > 0]
    answers: list[tuple[int, dict[str, Any]]] = [
        (
            row.position,
            _ok_result(manifest, row, np.zeros((0, len(manifest.output.class_names))), row.seconds),
        )
        for row in rows
        if row.matrix.shape[0] == 0
    ]
    if not non_empty:
        return answers
    started = time.perf_counter()
    try:
        probabilities = _probabilities(estimator, np.vstack([row.matrix for row in non_empty]), manifest)
    except Exception:
        if len(non_empty) == 1:
            return [*answers, _predict_one(manifest, estimator, non_empty[0])]
        # The stacked call failed: retry one request at a time to find the culprit.
        return [*answers, *(_predict_one(manifest, estimator, row) for row in non_empty)]
    call_seconds = time.perf_counter() - started
    offset = 0
    for row in non_empty:
        count = row.matrix.shape[0]
        part = probabilities[offset : offset + count]
        offset += count
        answers.append((row.position, _checked_result(manifest, row, part, row.seconds + call_seconds)))
    return answers


def _predict_one(manifest: Manifest, estimator: Any, row: _Rows) -> tuple[int, dict[str, Any]]:
    started = time.perf_counter()
    try:
        probabilities = _probabilities(estimator, row.matrix, manifest)
    except Exception as exc:
        return row.position, error_result(
            manifest, "model_failed", f"{manifest.name}@{manifest.version} raised {exc!r}"
        )
    return row.position, _checked_result(
        manifest, row, probabilities, row.seconds + time.perf_counter() - started
    )


def _probabilities(estimator: Any, matrix: np.ndarray, manifest: Manifest) -> np.ndarray:
    probabilities = np.asarray(estimator.predict_proba(matrix), dtype=np.float64)
    expected = (matrix.shape[0], len(manifest.output.class_names))
    if probabilities.shape != expected:
        raise ValueError(f"predict_proba returned shape {probabilities.shape}, expected {expected}")
    return probabilities


def _checked_result(
    manifest: Manifest, row: _Rows, probabilities: np.ndarray, seconds: float
) -> dict[str, Any]:
    if not np.all(np.isfinite(probabilities)):
        return error_result(
            manifest,
            "model_failed",
            f"{manifest.name}@{manifest.version} returned a non-finite probability (NaN or Infinity)",
        )
    return _ok_result(manifest, row, np.clip(probabilities, 0.0, 1.0), seconds)


def _ok_result(manifest: Manifest, row: _Rows, probabilities: np.ndarray, seconds: float) -> dict[str, Any]:
    return {
        "model": manifest.name,
        "version": manifest.version,
        "task": manifest.task,
        "status": "ok",
        "latency_ms": round(seconds * 1000.0, 3),
        "output": format_output(manifest, row.ids, probabilities),
    }


def format_output(manifest: Manifest, ids: Sequence[Any], probabilities: np.ndarray) -> dict[str, Any]:
    """Shape model output as the v1 contract says, with plain Python types only."""
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
