"""Write model versions into a repository the way a training job publishes them."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import networkx as nx
import numpy as np
import sklearn

from graphinfer.models.manifest import (
    ARTIFACT_NAME,
    MANIFEST_NAME,
    FeatureSpec,
    InputSignature,
    Manifest,
    OutputSpec,
    TrainingInfo,
)

# A graph-level feature set every MUTAG-style request (nodes with a 'label') fits.
GRAPH_FEATURES = FeatureSpec(name="wl_histogram", params={"dim": 16, "iterations": 1}, version=1)


def artifact_bytes(estimator: Any) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    return buffer.getvalue()


def write_model(
    repository: Path,
    name: str,
    version: int,
    estimator: Any,
    *,
    task: str = "graph",
    class_names: tuple[str, ...] = ("no", "yes"),
    output_kind: str = "classes",
    features: FeatureSpec = GRAPH_FEATURES,
    signature: InputSignature | None = None,
    library_versions: dict[str, str] | None = None,
    staged: bool = True,
) -> Path:
    """Publish ``estimator`` as ``repository/name/version``; return the version directory."""
    data = artifact_bytes(estimator)
    manifest = Manifest(
        name=name,
        version=version,
        task=task,
        input=signature or InputSignature(task=task, node_attributes=["label"]),
        features=features,
        output=OutputSpec(kind=output_kind, class_names=list(class_names), positive_class=class_names[-1]),
        sha256=hashlib.sha256(data).hexdigest(),
        training=TrainingInfo(dataset="synthetic", source="tests", split="none"),
        library_versions=library_versions
        or {
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
            "networkx": nx.__version__,
        },
        created_at=datetime.now(UTC),
    )
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir)) if staged else target
    staging.mkdir(exist_ok=True)
    os.chmod(staging, 0o755)
    (staging / ARTIFACT_NAME).write_bytes(data)
    (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
    if staged:
        os.rename(staging, target)
    return target


def graph_request(request_id: str, *, models: list[str] | None = None, size: int = 3) -> dict[str, Any]:
    """A small labelled path graph, as MUTAG-style graph-task requests look."""
    request: dict[str, Any] = {
        "request_id": request_id,
        "graph": {
            "nodes": [{"id": index, "label": "C" if index % 2 else "N"} for index in range(size)],
            "edges": [{"source": index, "target": index + 1} for index in range(size - 1)],
        },
        "task": "graph",
    }
    if models is not None:
        request["models"] = models
    return request
