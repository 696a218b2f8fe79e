"""Named, parameterised, versioned feature extractors over a request's graph.

A model's manifest names its feature set as a :class:`FeatureSpec`: extractor
name, parameters and code version. The engine calls :func:`extract` for each
model and request. The full-graph result of one extractor is computed once
per graph and kept in ``GraphInput.cache``, so models that ask for the same
name, parameters and version share it.

Every extractor declares how it treats multigraphs, self-loops and direction
(see :func:`describe`), and returns features for any graph that
:func:`graphinfer.models.graph.build_graph` accepts, including directed graphs,
multigraphs, self-loops, a single node and graphs without edges.

An extractor's output for given input and parameters never changes within one
version. Code that changes it registers a new version beside the old one, so
models trained on the old output keep loading.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import networkx as nx
import numpy as np
import scipy.sparse as sp

from graphinfer.errors import ErrorDetail, GraphinferError
from graphinfer.models.graph import GraphInput
from graphinfer.models.manifest import FeatureSpec

CACHE_KEY_PREFIX = "features"

# A full-graph result: one row for graph extractors, one row per node (in
# GraphInput.node_ids order) for node extractors.
FullResult: TypeAlias = np.ndarray | sp.csr_matrix


@dataclass(frozen=True)
class Param:
    """One extractor parameter: its default, accepted type and bounds.

    ``kind`` is ``"int"``, ``"bool"``, ``"str"`` or ``"str_or_null"``.
    """

    default: Any
    kind: str
    description: str
    minimum: int | None = None
    maximum: int | None = None

    def validate(self, extractor: str, name: str, value: Any) -> Any:
        """Return ``value`` if it fits this parameter, else raise ``incompatible_input``."""
        if self.kind == "bool":
            valid = isinstance(value, bool)
        elif self.kind == "int":
            valid = isinstance(value, int) and not isinstance(value, bool)
            if valid and self.minimum is not None:
                valid = value >= self.minimum
            if valid and self.maximum is not None:
                valid = value <= self.maximum
        elif self.kind == "str":
            valid = isinstance(value, str) and value != ""
        else:
            valid = value is None or (isinstance(value, str) and value != "")
        if not valid:
            raise _incompatible(
                f"feature parameter {name!r} of {extractor} is {value!r}; expected {self.expected()}",
                field=f"features.params.{name}",
                value=value,
                limit=self.expected(),
            )
        return value

    def expected(self) -> str:
        if self.kind == "int":
            bounds = []
            if self.minimum is not None:
                bounds.append(f">= {self.minimum}")
            if self.maximum is not None:
                bounds.append(f"<= {self.maximum}")
            return " ".join(["an integer", " and ".join(bounds)]).strip()
        return {
            "bool": "true or false",
            "str": "a non-empty string",
            "str_or_null": "a non-empty string or null",
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
        return described


class Extractor(ABC):
    """A feature extractor: one name and code version, with its parameters.

    Subclasses set the class attributes and implement :meth:`compute`, which
    returns the full-graph result for already validated parameters.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    task: ClassVar[str]
    params: ClassVar[Mapping[str, Param]]
    multigraph: ClassVar[str]
    self_loops: ClassVar[str]
    direction: ClassVar[str]

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def resolve_params(self, requested: Mapping[str, Any]) -> dict[str, Any]:
        """Return every parameter's value: ``requested`` ones checked, defaults for the rest."""
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
            value = requested.get(name, param.default)
            resolved[name] = param.validate(self.label, name, value)
        return resolved

    @abstractmethod
    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> FullResult:
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
        }


class FeatureRegistry:
    """Extractors by name and version, and the memoised :meth:`extract` over them."""

    def __init__(self) -> None:
        self._extractors: dict[tuple[str, int], Extractor] = {}

    def register(self, extractor_class: type[Extractor]) -> type[Extractor]:
        """Add an extractor class; usable as a class decorator."""
        key = (extractor_class.name, extractor_class.version)
        if key in self._extractors:
            raise ValueError(f"feature extractor {key[0]}@{key[1]} is already registered")
        self._extractors[key] = extractor_class()
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

    def extract(
        self,
        spec: FeatureSpec,
        graph_input: GraphInput,
        task: str,
        node_targets: Sequence[Hashable] | None = None,
    ) -> np.ndarray:
        """Return the feature matrix for one model on one graph, as C-contiguous float64.

        For task ``graph`` the matrix has one row and ``node_targets`` is not
        used. For task ``node`` it has one row per id in ``node_targets``, in
        that order, or one per node in ``graph_input.node_ids`` order when
        ``node_targets`` is None. The result is a fresh array that the caller
        may modify.

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
        key = feature_cache_key(extractor, params)
        full = graph_input.cache.get(key)
        if full is None:
            full = extractor.compute(graph_input, params)
            graph_input.cache[key] = full

        if task == "graph":
            return np.array(_dense(full), dtype=np.float64, order="C", copy=True)
        # Row selection copies, so the cached result stays unchanged.
        selected = _dense(full[_target_rows(graph_input, node_targets)])
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
    node_targets: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """Return one model's feature matrix from the default registry.

    See :meth:`FeatureRegistry.extract` for the shape, order and errors.
    """
    return REGISTRY.extract(spec, graph_input, task, node_targets)


def describe() -> list[dict[str, Any]]:
    """Describe every registered extractor: name, version, task, parameters and graph treatment."""
    return REGISTRY.describe()


def _dense(matrix: Any) -> np.ndarray:
    if sp.issparse(matrix):
        return matrix.toarray()
    return np.asarray(matrix)


def _incompatible(message: str, *, field: str, value: Any, limit: Any) -> GraphinferError:
    return GraphinferError(message, code="incompatible_input", details=[ErrorDetail(field, value, limit)])


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


def _edges_between_distinct_nodes(
    graph: nx.Graph, weight: str | None
) -> Iterator[tuple[Hashable, Hashable, Any]]:
    """Yield ``(u, v, weight)`` for every edge, once per parallel edge, skipping self-loops."""
    if weight is None:
        for u, v in graph.edges():
            if u != v:
                yield u, v, 1.0
        return
    for u, v, value in graph.edges(data=weight, default=1.0):
        if u != v:
            yield u, v, value


def undirected_adjacency(graph_input: GraphInput, weight: str | None = None) -> sp.csr_matrix:
    """Build the symmetric adjacency matrix in ``node_ids`` order, without self-loops.

    With ``weight`` None every linked pair gets 1, however many edges join it
    in either direction. With ``weight`` set, entry (u, v) is the sum of that
    attribute over all edges between u and v in either direction, and an edge
    without the attribute counts 1. Weights must be finite and non-negative.
    """
    index = graph_input.index
    size = graph_input.number_of_nodes
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for u, v, value in _edges_between_distinct_nodes(graph_input.graph, weight):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise _incompatible(
                f"edge ({u!r}, {v!r}) has {weight!r} = {value!r}; edge weights read as "
                f"{weight!r} must be finite non-negative numbers",
                field=f"graph.edges.{weight}",
                value=value,
                limit="a finite number >= 0",
            )
        rows.append(index[u])
        cols.append(index[v])
        values.append(float(value))

    one_way = sp.coo_matrix(
        (
            np.asarray(values, dtype=np.float64),
            (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)),
        ),
        shape=(size, size),
    )
    adjacency = (one_way + one_way.T).tocsr()
    adjacency.sum_duplicates()
    if weight is None:
        adjacency.data[:] = 1.0
    adjacency.sort_indices()
    return adjacency


def _attribute_text(value: Any) -> str:
    # Integers and strings with the same digits give the same text on purpose,
    # because producers differ in whether they send atom codes as 1 or "1".
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _digest(text: str, size: int = 16) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=size).hexdigest()


def _bucket(round_index: int, label_hash: str, dim: int) -> int:
    digest = hashlib.blake2b(f"{round_index}:{label_hash}".encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % dim


@REGISTRY.register
class WeisfeilerLehmanHistogram(Extractor):
    """Hashed histogram of Weisfeiler-Lehman subtree labels of a node attribute.

    Round 0 labels each node with a digest of its attribute value. Round i
    labels it with networkx's blake2b Weisfeiler-Lehman hash of its i-hop
    subtree. Every (round, label) pair goes to one of ``dim`` buckets through a
    blake2b digest, and the row counts nodes per bucket. With ``statistics``
    four columns follow: node count, edge count, mean degree and max degree of
    the simple undirected view. The row depends neither on node id values nor
    on node or edge order. Attribute values that are strings are used as is and
    others as their JSON text, so ``1`` and ``"1"`` give the same label.
    """

    # NOTE: rounds 1 and later use networkx's own WL label format, so a
    # networkx release that changes it changes this output. networkx 3.5 changed
    # the hashes of directed and attribute-less graphs only, and this extractor
    # passes neither. Manifests record the networkx version used in training.
    name = "wl_histogram"
    version = 1
    task = "graph"
    params: ClassVar[Mapping[str, Param]] = {
        "node_attribute": Param("label", "str", "Node attribute whose values seed the labels."),
        "iterations": Param(3, "int", "Weisfeiler-Lehman rounds after round 0.", minimum=0, maximum=16),
        "dim": Param(1024, "int", "Number of hashed histogram buckets.", minimum=1, maximum=1 << 20),
        "statistics": Param(True, "bool", "Append node count, edge count, mean degree and max degree."),
    }
    multigraph = "parallel edges collapse into one edge; edge attributes are not read"
    self_loops = "dropped: a self-loop changes neither the labels nor the statistics"
    direction = "ignored: u->v and v->u are the same undirected edge"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        attribute = params["node_attribute"]
        dim = params["dim"]
        iterations = params["iterations"]

        simple = nx.Graph()
        initial_labels: dict[Hashable, str] = {}
        for node, data in graph_input.graph.nodes(data=True):
            value = data.get(attribute)
            if value is None:
                raise _incompatible(
                    f"{self.label} reads node attribute {attribute!r}, which node {node!r} lacks; "
                    f"give every node a non-null {attribute!r}",
                    field=f"graph.nodes.{attribute}",
                    value=node,
                    limit=f"node attribute {attribute!r}",
                )
            # A fixed-length hex digest keeps networkx's ASCII-only hashing
            # working for any text, and makes its concatenated neighbour
            # labels unambiguous from round 1 on.
            initial_labels[node] = _digest(_attribute_text(value))
            simple.add_node(node, wl_label=initial_labels[node])
        simple.add_edges_from((u, v) for u, v, _ in _edges_between_distinct_nodes(graph_input.graph, None))

        histogram = np.zeros(dim, dtype=np.float64)
        for label in initial_labels.values():
            histogram[_bucket(0, label, dim)] += 1.0
        if iterations > 0 and simple.number_of_nodes() > 0:
            subtree_hashes = nx.weisfeiler_lehman_subgraph_hashes(
                simple, node_attr="wl_label", iterations=iterations
            )
            for node_hashes in subtree_hashes.values():
                for round_index, label in enumerate(node_hashes, start=1):
                    histogram[_bucket(round_index, label, dim)] += 1.0

        if not params["statistics"]:
            return histogram.reshape(1, -1)
        degrees = [degree for _, degree in simple.degree()]
        nodes = simple.number_of_nodes()
        statistics = np.asarray(
            [
                nodes,
                simple.number_of_edges(),
                float(np.mean(degrees)) if nodes else 0.0,
                float(max(degrees)) if nodes else 0.0,
            ],
            dtype=np.float64,
        )
        return np.concatenate([histogram, statistics]).reshape(1, -1)


@REGISTRY.register
class SimplifiedGraphConvolution(Extractor):
    """Node features propagated ``hops`` times with S = D^-1 (A + I), as in SGC.

    A is the symmetric adjacency of the undirected simple view, I adds one
    self-loop per node, and D is the diagonal matrix of the row sums of A + I. The result is S^k X,
    or [X, SX, ..., S^k X] with ``concat``. With ``normalize_features`` each
    row of X is first divided by its sum (rows of zeros stay zero). A node's
    row depends only on its ``hops``-hop neighbourhood, so a request holding
    that ego subgraph gives its centre the same row as the whole graph.
    """

    name = "sgc"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {
        "hops": Param(2, "int", "Propagation steps k.", minimum=0, maximum=8),
        "concat": Param(False, "bool", "Return [X, SX, ..., S^k X] instead of S^k X."),
        "normalize_features": Param(False, "bool", "Divide each row of X by its sum first."),
        "weight": Param(None, "str_or_null", "Edge attribute read as weight; null counts every edge as 1."),
    }
    multigraph = (
        "parallel edges collapse into one edge of weight 1; with `weight` set, their weights are summed"
    )
    self_loops = (
        "input self-loops are dropped; every node then gets exactly one self-loop "
        "of weight 1 (the I in A + I)"
    )
    direction = (
        "ignored: u->v links u and v both ways; with `weight` set, the weights of u->v and v->u are summed"
    )

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> sp.csr_matrix:
        if graph_input.number_of_nodes == 0:
            # A graph without nodes has no feature dimension either, and no row to return.
            return sp.csr_matrix((0, 0), dtype=np.float64)
        if graph_input.features is None:
            raise _incompatible(
                f"{self.label} reads node features, but this graph's nodes have none; "
                "give every node 'features'",
                field="graph.nodes.features",
                value=None,
                limit="node features",
            )
        features = sp.csr_matrix(graph_input.features, dtype=np.float64)
        size = features.shape[0]
        hops = params["hops"]

        if params["normalize_features"]:
            row_sums = np.asarray(features.sum(axis=1)).ravel()
            scale = np.divide(1.0, row_sums, out=np.zeros_like(row_sums), where=row_sums != 0)
            features = sp.csr_matrix(sp.diags(scale) @ features)

        # Huge weights may overflow while summing. The check below reports that
        # as an input error, so numpy's overflow warning would only be noise.
        with np.errstate(over="ignore"):
            adjacency = undirected_adjacency(graph_input, params["weight"])
            with_self_loops = adjacency + sp.identity(size, format="csr")
            degrees = np.asarray(with_self_loops.sum(axis=1)).ravel()
        if not np.all(np.isfinite(degrees)):
            raise _incompatible(
                f"the weighted degree of some node overflows to infinity with edge weights "
                f"{params['weight']!r}; scale the weights down",
                field=f"graph.edges.{params['weight']}",
                value=None,
                limit="weighted degrees below 1.8e308",
            )
        propagation = sp.csr_matrix(sp.diags(1.0 / degrees) @ with_self_loops)
        propagation.sort_indices()

        blocks = [features]
        current = features
        for _ in range(hops):
            current = sp.csr_matrix(propagation @ current)
            blocks.append(current)
        if params["concat"]:
            return sp.hstack(blocks, format="csr", dtype=np.float64)
        return current
