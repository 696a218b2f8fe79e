"""Score v1 requests through the serving engine and compute held-out metrics from the replies.

:func:`serve` takes the path a pool process takes for a Kafka message: the
request is encoded as JSON bytes, decoded and validated by
:func:`graphinfer.models.decode.decode_request` with the default limits, and
run by :func:`graphinfer.models.engine.run_batch`. A metric computed from its
output is therefore the metric of the service, down to the rounding of
probabilities to 6 decimals in replies.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from graphinfer.models.decode import Limits, decode_request
from graphinfer.models.engine import run_batch
from graphinfer.models.manifest import Manifest


class EvaluationFailed(RuntimeError):
    """A held-out request did not get an ``ok`` result from the engine."""


def serve(manifest: Manifest, estimator: Any, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run one model on wire-format requests; return each request's ``output`` in order.

    Raises :class:`EvaluationFailed` naming the request when a request is
    rejected or the model returns an error result.
    """
    ref = f"{manifest.name}@{manifest.version}"
    decoded = [decode_request(json.dumps(request).encode("utf-8"), Limits()) for request in requests]
    results = run_batch(decoded, [[ref]] * len(decoded), {ref: estimator}, {ref: manifest})
    outputs = []
    for request, [result] in zip(requests, results, strict=True):
        if result["status"] != "ok":
            raise EvaluationFailed(
                f"{ref} failed on request {request.get('request_id')!r}: {result['error']}"
            )
        outputs.append(result["output"])
    return outputs


def node_predictions(outputs: Sequence[dict[str, Any]]) -> dict[Hashable, dict[str, Any]]:
    """Collect the per-node predictions of node-task outputs by node id."""
    return {item["id"]: item for output in outputs for item in output["nodes"]}


def edge_scores(outputs: Sequence[dict[str, Any]]) -> dict[frozenset[Hashable], float]:
    """Collect edge-task scores by unordered pair, since replies canonicalise undirected pairs."""
    return {
        frozenset((item["source"], item["target"])): item["score"]
        for output in outputs
        for item in output["edges"]
    }


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float:
    """Return the fraction of ``predicted`` labels equal to ``expected``."""
    if len(predicted) != len(expected) or not expected:
        raise ValueError(
            f"accuracy needs equally long, non-empty lists; got {len(predicted)} and {len(expected)}"
        )
    return float(np.mean([a == b for a, b in zip(predicted, expected, strict=True)]))


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Return the area under the ROC curve of ``scores`` for the ``positive`` flags."""
    return float(roc_auc_score(np.asarray(positive, dtype=bool), np.asarray(scores, dtype=np.float64)))
