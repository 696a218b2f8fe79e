"""The ``manifest.json`` that sits beside every ``model.joblib``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"
ARTIFACT_NAME = "model.joblib"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class InputSignature(BaseModel):
    """What a model accepts; no model runs on input that does not fit it."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["node", "edge", "graph"]
    feature_dim: int | None = Field(
        default=None, ge=1, description="Node feature dimension the model reads; null when it reads none."
    )
    node_attributes: list[str] = Field(
        default_factory=list, description="Node attributes every node must carry, such as 'label'."
    )
    edge_attributes: list[str] = Field(
        default_factory=list, description="Edge attributes every edge must carry, such as 'weight'."
    )
    directed: bool | None = Field(
        default=None, description="true or false when the model fits only that kind of graph; null for both."
    )


class FeatureSpec(BaseModel):
    """The feature set a model was trained on: extractor name, parameters and code version."""

    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    version: int = Field(ge=1, description="Version of the extractor code; a change of output bumps it.")


class OutputSpec(BaseModel):
    """How to read the artifact's output.

    ``classes``: ``predict_proba`` columns are ``class_names`` and the reply
    carries a label and probabilities. ``score``: a binary classifier whose
    positive-class probability is the reply's ``score``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["classes", "score"]
    class_names: list[str] = Field(min_length=2)
    positive_class: str | None = None


class Metric(BaseModel):
    """A held-out metric and how it was measured."""

    model_config = ConfigDict(extra="forbid")

    value: float
    std: float | None = None
    protocol: str


class TrainingInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str
    source: str
    split: str
    seed: int | None = None
    train_size: int | None = None
    test_size: int | None = None


class Manifest(BaseModel):
    """Everything needed to load, check and serve one model version."""

    model_config = ConfigDict(extra="forbid")

    manifest_version: Literal[1] = 1
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int = Field(ge=1)
    task: Literal["node", "edge", "graph"]
    description: str = ""
    input: InputSignature
    features: FeatureSpec
    output: OutputSpec
    artifact: str = ARTIFACT_NAME
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training: TrainingInfo
    metrics: dict[str, Metric] = Field(default_factory=dict)
    library_versions: dict[str, str]
    created_at: AwareDatetime | datetime
