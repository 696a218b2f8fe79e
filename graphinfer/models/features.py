"""Named, parameterised, versioned feature extractors over a request's graph.

A model's manifest names its feature set as a :class:`FeatureSpec`: extractor
name, parameters and code version. The engine calls :func:`extract` for each
model and request. The full-graph result of one extractor is computed once
per graph and kept in ``GraphInput.cache``, so models that ask for the same
name, parameters and version share it. Edge extractors keep one row per
scored pair there instead, so each pair is scored once per graph.

Every extractor declares how it treats multigraphs, self-loops and direction,
and what it costs (see :func:`describe`), and returns features for any graph
that :func:`graphinfer.models.graph.build_graph` accepts, including directed
graphs, multigraphs, self-loops, a single node and graphs without edges.

An extractor's output for given input and parameters never changes within one
version. Code that changes it registers a new version beside the old one, so
models trained on the old output keep loading.

The built-in extractors live in :mod:`graphinfer.models.extractors` and are
registered when this module is imported.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import numpy as np
import scipy.sparse as sp
from pydantic import ValidationError

from graphinfer.errors import ErrorDetail, GraphinferError
from graphinfer.models.extractors.views import incompatible as _incompatible
from graphinfer.models.graph import GraphInput
from graphinfer.models.manifest import FeatureSpec

CACHE_KEY_PREFIX = "features"

# A full-graph result: one row for graph extractors, one row per node (in
# GraphInput.node_ids order) for node extractors.
FullResult: TypeAlias = np.ndarray | sp.csr_matrix

_SPEC_KINDS = ("spec", "spec_list")


@dataclass(frozen=True)
class Param:
    """One extractor parameter: its default, accepted type and bounds.

    ``kind`` is one of:

    - ``"int"``, ``"float"`` or ``"float_or_null"``, within ``minimum`` and ``maximum``;
    - ``"bool"``, ``"str"`` or ``"str_or_null"``;
    - ``"choice"``: one of ``choices``;
    - ``"str_list"``: a non-empty list of distinct non-empty strings;
    - ``"spec"``: a nested feature spec ``{"name", "version", "params"}`` of a ``task`` extractor;
    - ``"spec_list"``: a non-empty list of such specs.
    """

    default: Any
    kind: str
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    task: str | None = None

    def validate(self, extractor: str, name: str, value: Any) -> Any:
        """Return ``value`` normalised if it fits this parameter, else raise ``incompatible_input``.

        Nested specs are only checked for shape here, because the registry resolves them.
        """
        valid = self._fits(value)
        if not valid:
            raise _incompatible(
                f"feature parameter {name!r} of {extractor} is {value!r}; expected {self.expected()}",
                field=f"features.params.{name}",
                value=value,
                limit=self.expected(),
            )
        if self.kind in ("float", "float_or_null") and value is not None:
            return float(value)
        if self.kind == "str_list":
            return list(value)
        return value

    def _fits(self, value: Any) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "float_or_null" and value is None:
            return True
        if self.kind in ("int", "float", "float_or_null"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return False
            if self.kind == "int" and not isinstance(value, int):
                return False
            if isinstance(value, float) and not math.isfinite(value):
                return False
            if self.minimum is not None and value < self.minimum:
                return False
            return self.maximum is None or value <= self.maximum
        if self.kind == "str":
            return isinstance(value, str) and value != ""
        if self.kind == "str_or_null":
            return value is None or (isinstance(value, str) and value != "")
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "str_list":
            return (
                isinstance(value, list)
                and len(value) > 0
                and all(isinstance(item, str) and item != "" for item in value)
                and len(set(value)) == len(value)
            )
        if self.kind == "spec":
            return isinstance(value, Mapping)
        if self.kind == "spec_list":
            return isinstance(value, list) and len(value) > 0 and all(isinstance(v, Mapping) for v in value)
        raise ValueError(f"unknown parameter kind {self.kind!r}")

    def expected(self) -> str:
        if self.kind in ("int", "float", "float_or_null"):
            bounds = []
            if self.minimum is not None:
                bounds.append(f">= {self.minimum}")
            if self.maximum is not None:
                bounds.append(f"<= {self.maximum}")
            noun = "an integer" if self.kind == "int" else "a number"
            text = " ".join([noun, " and ".join(bounds)]).strip()
            return text + " or null" if self.kind == "float_or_null" else text
        if self.kind == "choice":
            return "one of " + ", ".join(repr(choice) for choice in self.choices)
        return {
            "bool": "true or false",
            "str": "a non-empty string",
            "str_or_null": "a non-empty string or null",
            "str_list": "a non-empty list of distinct non-empty strings",
            "spec": f"a feature spec object with name, version and params, of a {self.task} extractor",
            "spec_list": (
                f"a non-empty list of feature spec objects with name, version and params, "
                f"of {self.task} extractors"
            ),
        }[self.kind]

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "default": self.default,
            "type": self.kind,
            "description": self.description,
        }
        if self.minimum is not None:
            described["minimum"] = self.minimum
        if self.maximum is not None:
            described["maximum"] = self.maximum
        if self.choices:
            described["choices"] = list(self.choices)
        if self.task is not None:
            described["task"] = self.task
        return described


class Extractor(ABC):
    """A feature extractor: one name and code version, with its parameters.

    Subclasses set the class attributes and implement :meth:`compute`, which
    returns the full-graph result for already validated parameters. ``cost``
    states the time an extraction takes as a function of the node count n,
    the edge count m and any bounding parameter. ``registry`` is the registry
    the extractor was registered in; extractors built from other extractors
    compute their parts through it.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    task: ClassVar[str]
    params: ClassVar[Mapping[str, Param]]
    multigraph: ClassVar[str]
    self_loops: ClassVar[str]
    direction: ClassVar[str]
    cost: ClassVar[str] = ""
    registry: FeatureRegistry | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def resolve_params(self, requested: Mapping[str, Any]) -> dict[str, Any]:
        """Return every parameter's value: ``requested`` ones checked, defaults for the rest.

        A nested feature spec is replaced by its canonical form, with every
        parameter of the nested extractor written out.
        """
        unknown = sorted(set(requested) - set(self.params))
        if unknown:
            raise _incompatible(
                f"{self.label} has no parameter {unknown[0]!r}; its parameters are "
                f"{', '.join(sorted(self.params)) or 'none'}",
                field=f"features.params.{unknown[0]}",
                value=requested[unknown[0]],
                limit=sorted(self.params),
            )
        resolved = {}
        for name, param in self.params.items():
            value = param.validate(self.label, name, requested.get(name, param.default))
            if param.kind in _SPEC_KINDS:
                value = self._resolve_nested(name, param, value)
            resolved[name] = value
        return resolved

    def _resolve_nested(self, name: str, param: Param, value: Any) -> Any:
        if self.registry is None:
            raise RuntimeError(f"{self.label} reads nested feature specs but is not registered")
        if param.kind == "spec":
            return self.registry.canonical_spec(value, param.task, f"features.params.{name}")
        return [
            self.registry.canonical_spec(item, param.task, f"features.params.{name}[{position}]")
            for position, item in enumerate(value)
        ]

    @abstractmethod
    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> Any:
        """Compute the full-graph result."""

    def describe(self) -> dict[str, Any]:
        summary = (type(self).__doc__ or "").strip().split("\n\n")[0]
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "description": " ".join(summary.split()),
            "params": {name: param.describe() for name, param in self.params.items()},
            "multigraph": self.multigraph,
            "self_loops": self.self_loops,
            "direction": self.direction,
            "cost": self.cost,
        }


class EdgeExtractor(Extractor):
    """An extractor that scores node pairs: one row per ``(source, target)`` pair.

    Subclasses implement :meth:`score_pairs`. The full-graph result of an edge
    extractor is its memo of rows by pair, which the registry fills on demand,
    so a pair is scored once per graph whichever models ask for it.
    """

    task = "edge"

    def compute(
        self, graph_input: GraphInput, params: Mapping[str, Any]
    ) -> dict[tuple[int, int], np.ndarray]:
        return {}

    @abstractmethod
    def score_pairs(
        self, graph_input: GraphInput, params: Mapping[str, Any], pairs: np.ndarray
    ) -> np.ndarray:
        """Return one float64 row per pair; ``pairs`` is an (p, 2) array of node rows."""


class FeatureRegistry:
    """Extractors by name and version, and the memoised :meth:`extract` over them."""

    def __init__(self) -> None:
        self._extractors: dict[tuple[str, int], Extractor] = {}

    def register(self, extractor_class: type[Extractor]) -> type[Extractor]:
        """Add an extractor class; usable as a class decorator."""
        key = (extractor_class.name, extractor_class.version)
        if key in self._extractors:
            raise ValueError(f"feature extractor {key[0]}@{key[1]} is already registered")
        extractor = extractor_class()
        extractor.registry = self
        self._extractors[key] = extractor
        return extractor_class

    def available(self) -> list[str]:
        return [f"{name}@{version}" for name, version in sorted(self._extractors)]

    def get(self, name: str, version: int) -> Extractor:
        """Return the extractor for ``name`` and ``version``, else raise ``incompatible_input``."""
        extractor = self._extractors.get((name, version))
        if extractor is None:
            known_versions = sorted(v for n, v in self._extractors if n == name)
            if known_versions:
                reason = (
                    f"this build implements {name} only in version(s) "
                    f"{', '.join(str(v) for v in known_versions)}"
                )
            else:
                reason = f"this build has no extractor named {name!r}"
            raise _incompatible(
                f"feature extractor {name}@{version} is not available: {reason}. Available "
                f"extractors: {', '.join(self.available())}. Retrain the model with one of "
                "them or run a graphinfer release that provides it",
                field="features",
                value=f"{name}@{version}",
                limit=self.available(),
            )
        return extractor

    def describe(self) -> list[dict[str, Any]]:
        return [self._extractors[key].describe() for key in sorted(self._extractors)]

    def canonical_spec(self, value: Any, task: str | None, field: str) -> dict[str, Any]:
        """Check a nested feature spec and return it with every parameter written out."""
        try:
            spec = value if isinstance(value, FeatureSpec) else FeatureSpec.model_validate(value)
        except ValidationError as exc:
            problem = exc.errors(include_url=False)[0]
            raise _incompatible(
                f"{field} is not a valid feature spec: {'.'.join(str(p) for p in problem['loc'])} "
                f"{problem['msg']}; give an object with name, version and params",
                field=field,
                value=str(value),
                limit="{name, version, params}",
            ) from None
        extractor = self.get(spec.name, spec.version)
        if task is not None and extractor.task != task:
            raise _incompatible(
                f"{field} names {extractor.label}, a {extractor.task} extractor, but it must name "
                f"a {task} extractor",
                field=field,
                value=extractor.label,
                limit=f"a {task} extractor",
            )
        params = extractor.resolve_params(spec.params)
        return {"name": extractor.name, "version": extractor.version, "params": params}

    def full_result(self, spec: Mapping[str, Any], graph_input: GraphInput) -> FullResult:
        """Return the cached full-graph result of a canonical node or graph spec."""
        extractor = self.get(spec["name"], spec["version"])
        return self._full(extractor, spec["params"], graph_input)

    def pair_rows(self, spec: Mapping[str, Any], graph_input: GraphInput, pairs: np.ndarray) -> np.ndarray:
        """Return the rows of a canonical edge spec for ``pairs`` (an (p, 2) array of node rows)."""
        extractor = self.get(spec["name"], spec["version"])
        if not isinstance(extractor, EdgeExtractor):
            raise TypeError(f"{extractor.label} is not an edge extractor")
        return self._pairs(extractor, spec["params"], graph_input, pairs)

    def _full(self, extractor: Extractor, params: Mapping[str, Any], graph_input: GraphInput) -> Any:
        key = feature_cache_key(extractor, params)
        full = graph_input.cache.get(key)
        if full is None:
            full = extractor.compute(graph_input, params)
            graph_input.cache[key] = full
        return full

    def _pairs(
        self,
        extractor: EdgeExtractor,
        params: Mapping[str, Any],
        graph_input: GraphInput,
        pairs: np.ndarray,
    ) -> np.ndarray:
        memo: dict[tuple[int, int], np.ndarray] = self._full(extractor, params, graph_input)
        keys = [(int(u), int(v)) for u, v in pairs.tolist()]
        missing = [key for key in dict.fromkeys(keys) if key not in memo]
        if missing or not keys:
            fresh = extractor.score_pairs(
                graph_input, params, np.asarray(missing, dtype=np.int64).reshape(-1, 2)
            )
            for key, row in zip(missing, fresh, strict=True):
                memo[key] = row
            if not keys:
                return np.zeros((0, fresh.shape[1]), dtype=np.float64)
        return np.vstack([memo[key] for key in keys]).astype(np.float64, copy=False)

    def extract(
        self,
        spec: FeatureSpec,
        graph_input: GraphInput,
        task: str,
        targets: Sequence[Any] | None = None,
    ) -> np.ndarray:
        """Return the feature matrix for one model on one graph, as C-contiguous float64.

        For task ``graph`` the matrix has one row and ``targets`` is not used.
        For task ``node`` it has one row per node id in ``targets``, in that
        order, or one per node in ``graph_input.node_ids`` order when
        ``targets`` is None. For task ``edge`` it has one row per
        ``(source, target)`` pair of node ids in ``targets``, in that order,
        or one per edge of the graph (parallel edges once) when ``targets`` is
        None. The result is a fresh array that the caller may modify.

        Raises :class:`GraphinferError` with code ``incompatible_input`` when
        the extractor, its version or a parameter is unknown, when the task
        does not match the extractor, or when the graph lacks what it reads.
        A target that is not a node raises code ``invalid_targets``.
        """
        extractor = self.get(spec.name, spec.version)
        if task != extractor.task:
            raise _incompatible(
                f"feature extractor {extractor.label} produces {extractor.task} features, but the "
                f"request task is {task!r}; send task {extractor.task!r} or choose a model "
                f"for task {task!r}",
                field="task",
                value=task,
                limit=extractor.task,
            )
        params = extractor.resolve_params(spec.params)

        if isinstance(extractor, EdgeExtractor):
            pairs = _pair_rows(graph_input, targets)
            return np.ascontiguousarray(self._pairs(extractor, params, graph_input, pairs), dtype=np.float64)
        full = self._full(extractor, params, graph_input)
        if task == "graph":
            return np.array(_dense(full), dtype=np.float64, order="C", copy=True)
        # Row selection copies, so the cached result stays unchanged.
        selected = _dense(full[_target_rows(graph_input, targets)])
        return np.ascontiguousarray(selected, dtype=np.float64)


def feature_cache_key(extractor: Extractor, params: Mapping[str, Any]) -> str:
    """Return the ``GraphInput.cache`` key of one extractor version with resolved parameters.

    JSON with sorted keys gives the same text for equal parameters in any order.
    """
    encoded = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return f"{CACHE_KEY_PREFIX}/{extractor.name}@{extractor.version}/{encoded}"


REGISTRY = FeatureRegistry()


def extract(
    spec: FeatureSpec,
    graph_input: GraphInput,
    task: str,
    targets: Sequence[Any] | None = None,
) -> np.ndarray:
    """Return one model's feature matrix from the default registry.

    See :meth:`FeatureRegistry.extract` for the shape, order and errors.
    """
    return REGISTRY.extract(spec, graph_input, task, targets)


def describe() -> list[dict[str, Any]]:
    """Describe every registered extractor: name, version, task, parameters, graph treatment and cost."""
    return REGISTRY.describe()


def _dense(matrix: Any) -> np.ndarray:
    if sp.issparse(matrix):
        return matrix.toarray()
    return np.asarray(matrix)


def _target_rows(graph_input: GraphInput, node_targets: Sequence[Hashable] | None) -> np.ndarray:
    if node_targets is None:
        return np.arange(graph_input.number_of_nodes, dtype=np.int64)
    rows = np.empty(len(node_targets), dtype=np.int64)
    for position, node_id in enumerate(node_targets):
        row = graph_input.index.get(node_id)
        if row is None:
            raise GraphinferError(
                f"targets.nodes[{position}] is {node_id!r}, which is not a node of this graph; "
                "name nodes listed in graph.nodes",
                code="invalid_targets",
                details=[ErrorDetail(f"targets.nodes[{position}]", node_id, "an id in graph.nodes")],
            )
        rows[position] = row
    return rows


def _pair_rows(graph_input: GraphInput, pairs: Sequence[Any] | None) -> np.ndarray:
    if pairs is None:
        edges = ((u, v) for u, v, *_ in graph_input.graph.edges)
        pairs = list(dict.fromkeys(edges))
    rows = np.empty((len(pairs), 2), dtype=np.int64)
    for position, pair in enumerate(pairs):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise GraphinferError(
                f"targets.edges[{position}] is {pair!r}; name each edge as a (source, target) pair",
                code="invalid_targets",
                details=[ErrorDetail(f"targets.edges[{position}]", repr(pair), "a (source, target) pair")],
            )
        for end, node_id in enumerate(pair):
            row = graph_input.index.get(node_id)
            if row is None:
                name = ("source", "target")[end]
                raise GraphinferError(
                    f"targets.edges[{position}].{name} is {node_id!r}, which is not a node of this "
                    "graph; name nodes listed in graph.nodes",
                    code="invalid_targets",
                    details=[
                        ErrorDetail(f"targets.edges[{position}].{name}", node_id, "an id in graph.nodes")
                    ],
                )
            rows[position, end] = row
    return rows


# Registers the built-in extractors; they import the names above, so this comes last.
from graphinfer.models.extractors import composite, edge, graph, node  # noqa: E402, F401
