"""The v1 wire contract: requests and replies as pydantic models.

The worker and the gateway both import this module, and the JSON Schema files
under ``graphinfer/schemas`` are generated from it (``python -m
graphinfer.models.schema``). Structural rules live here; rules that need the
whole graph (unique ids, edges to existing nodes, one feature dimension) live
in :mod:`graphinfer.models.graph`.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_MAJOR_VERSION = 1
TASKS = ("node", "edge", "graph")
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MODEL_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[1-9][0-9]{0,8})?$"

RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]
# Node ids are strings or integers. Strict types reject booleans and floats,
# which networkx would otherwise merge with the integer of the same value.
NodeId = StrictInt | StrictStr
Number = StrictInt | StrictFloat
# Node and edge attributes other than the reserved keys: JSON scalars or
# lists of them. Objects are not accepted as attribute values.
AttributeValue = StrictStr | StrictInt | StrictFloat | StrictBool | None | list[Any]


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return value


class SparseFeatures(BaseModel):
    """A sparse feature vector: the non-zero entries of a ``dim``-long vector."""

    model_config = ConfigDict(extra="forbid")

    indices: list[Annotated[StrictInt, Field(ge=0)]]
    values: list[Number]
    dim: Annotated[StrictInt, Field(ge=1, le=1_000_000)]

    @model_validator(mode="after")
    def _check_consistent(self) -> SparseFeatures:
        if len(self.indices) != len(self.values):
            raise ValueError(
                f"indices has {len(self.indices)} entries but values has {len(self.values)}; "
                "give one value per index"
            )
        if len(set(self.indices)) != len(self.indices):
            raise ValueError("indices contains a repeated index; list each index once")
        for index in self.indices:
            if index >= self.dim:
                raise ValueError(f"index {index} is outside dim {self.dim}; indices run from 0 to dim - 1")
        for value in self.values:
            _finite(float(value), "every feature value")
        return self


class Node(BaseModel):
    """One node: its id, optional features and any other attributes."""

    model_config = ConfigDict(extra="allow")

    id: NodeId
    features: list[Number] | SparseFeatures | None = None

    @field_validator("features", mode="before")
    @classmethod
    def _check_features(cls, value: Any) -> Any:
        # Decided by the JSON type, so an error names the form that was sent
        # instead of listing why the value fits neither form.
        if value is None:
            return None
        if isinstance(value, dict):
            try:
                return SparseFeatures.model_validate(value)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(part) for part in first["loc"])
                message = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"sparse features{' ' + where if where else ''}: {message}") from None
        if isinstance(value, list):
            for position, item in enumerate(value):
                if isinstance(item, bool) or not isinstance(item, int | float):
                    raise ValueError(f"dense features hold numbers; item {position} is {item!r}")
                _finite(float(item), "every feature value")
            return value
        raise ValueError(
            f"features is a {type(value).__name__}; send a list of numbers or "
            '{"indices": [...], "values": [...], "dim": N}'
        )

    @model_validator(mode="after")
    def _check_attributes(self) -> Node:
        for key, value in (self.model_extra or {}).items():
            _check_attribute(key, value)
        return self

    def attributes(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Edge(BaseModel):
    """One edge between two existing nodes, with optional weight and attributes."""

    model_config = ConfigDict(extra="allow")

    source: NodeId
    target: NodeId
    weight: Number | None = None
    key: NodeId | None = None

    @field_validator("weight")
    @classmethod
    def _check_weight(cls, value: float | None) -> float | None:
        return None if value is None else _finite(float(value), "weight")

    @model_validator(mode="after")
    def _check_attributes(self) -> Edge:
        for key, value in (self.model_extra or {}).items():
            _check_attribute(key, value)
        return self

    def attributes(self) -> dict[str, Any]:
        attributes = dict(self.model_extra or {})
        if self.weight is not None:
            attributes["weight"] = float(self.weight)
        return attributes


class GraphPayload(BaseModel):
    """A graph in node-link form; ``directed`` and ``multigraph`` default to false."""

    model_config = ConfigDict(extra="forbid")

    directed: StrictBool = False
    multigraph: StrictBool = False
    graph: dict[str, AttributeValue] = Field(default_factory=dict)
    nodes: list[Node]
    edges: list[Edge] | None = None
    links: list[Edge] | None = None

    @model_validator(mode="after")
    def _one_edge_list(self) -> GraphPayload:
        if self.edges is not None and self.links is not None:
            raise ValueError("graph has both 'edges' and 'links'; send the edge list under one of them")
        return self

    @property
    def edge_list(self) -> list[Edge]:
        if self.edges is not None:
            return self.edges
        return self.links or []


class EdgeTarget(BaseModel):
    """An edge to score, named by its two end nodes."""

    model_config = ConfigDict(extra="forbid")

    source: NodeId
    target: NodeId


class Targets(BaseModel):
    """Nodes (by id) and edges (as source and target pairs) to score."""

    model_config = ConfigDict(extra="forbid")

    nodes: list[NodeId] | None = None
    edges: list[EdgeTarget] | None = None


class PredictRequest(BaseModel):
    """A v1 inference request."""

    model_config = ConfigDict(extra="forbid")

    request_id: RequestId | None = None
    graph: GraphPayload
    task: StrictStr | None = None
    models: list[Annotated[str, Field(pattern=MODEL_REF_PATTERN)]] = Field(default_factory=list)
    targets: Targets | None = None
    metadata: dict[str, StrictStr] = Field(default_factory=dict)
    deadline: AwareDatetime | None = None


class ErrorDetailModel(BaseModel):
    field: str
    value: Any = None
    limit: Any = None


class ErrorObject(BaseModel):
    """The v1 error object: a code from the closed set, a message and the offending fields."""

    code: str
    message: str
    details: list[ErrorDetailModel] = Field(default_factory=list)


class ModelResult(BaseModel):
    """One selected model's result for one request."""

    model: str
    version: int
    task: Literal["node", "edge", "graph"]
    status: Literal["ok", "error"]
    latency_ms: float | None = None
    output: dict[str, Any] | None = None
    error: ErrorObject | None = None


class SkippedModel(BaseModel):
    """A model left out of an implicit selection because the graph does not fit it."""

    model: str
    version: int
    code: str
    message: str


class PredictReply(BaseModel):
    """A v1 reply, as written to ``predictions`` and ``graph-replies``."""

    request_id: str | None
    status: Literal["ok", "partial", "failed", "rejected", "expired", "pending"]
    source: Literal["online", "replay"]
    replay_run_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    results: list[ModelResult] = Field(default_factory=list)
    skipped: list[SkippedModel] = Field(default_factory=list)
    error: ErrorObject | None = None
    received_at: datetime | None = None
    completed_at: datetime | None = None


def _check_attribute(key: str, value: Any) -> None:
    if isinstance(value, float):
        _finite(value, f"attribute {key!r}")
    elif isinstance(value, dict):
        raise ValueError(f"attribute {key!r} is an object; attribute values must be JSON scalars or lists")


SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def json_schemas() -> dict[str, dict[str, Any]]:
    """Build the JSON Schema documents that Kafka producers validate against."""
    return {
        "request.v1.json": PredictRequest.model_json_schema(),
        "reply.v1.json": PredictReply.model_json_schema(mode="serialization"),
    }


def write_json_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_json_schemas():
        print(written_path)
