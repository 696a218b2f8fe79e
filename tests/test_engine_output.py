"""Tests of how the engine shapes model output for each task and output kind."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from graphinfer.models.engine import format_output
from graphinfer.models.manifest import (
    FeatureSpec,
    InputSignature,
    Manifest,
    OutputSpec,
    TrainingInfo,
)

PAIRS = [("a", "b"), ("b", "c")]
PROBABILITIES = np.array([[0.25, 0.75], [0.9, 0.1]])


def manifest(task: str, kind: str, positive: str | None = None) -> Manifest:
    return Manifest(
        name="fake",
        version=1,
        task=task,  # type: ignore[arg-type]
        input=InputSignature(task=task),  # type: ignore[arg-type]
        features=FeatureSpec(name="jaccard", version=1),
        output=OutputSpec(kind=kind, class_names=["absent", "present"], positive_class=positive),  # type: ignore[arg-type]
        sha256="0" * 64,
        training=TrainingInfo(dataset="none", source="this test", split="none"),
        library_versions={},
        created_at=datetime.now(UTC),
    )


@pytest.mark.parametrize("kind", ["score", "classes"])
def test_format_output_edge_scores(kind: str) -> None:
    output = format_output(manifest("edge", kind, "present"), PAIRS, PROBABILITIES)
    assert output == {
        "edges": [
            {"source": "a", "target": "b", "score": 0.75},
            {"source": "b", "target": "c", "score": 0.1},
        ]
    }


def test_format_output_edge_default_positive_class() -> None:
    output = format_output(manifest("edge", "score"), PAIRS, PROBABILITIES)
    assert [edge["score"] for edge in output["edges"]] == [0.75, 0.1]


def test_format_output_node_score() -> None:
    output = format_output(manifest("node", "score", "present"), ["u1"], PROBABILITIES[:1])
    assert output == {"nodes": [{"id": "u1", "score": 0.75}]}
