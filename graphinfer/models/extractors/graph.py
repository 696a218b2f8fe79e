"""Graph-level extractors: one row of features per request graph.

Every extractor here returns the same row when node ids are renamed or nodes
and edges are reordered (up to floating-point rounding of sums), because each
reads only the structure and attribute values of the graph.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterator, Mapping
from typing import Any, ClassVar

import networkx as nx
import numpy as np
from scipy.sparse.csgraph import connected_components

from graphinfer.models.extractors.views import degrees, triangle_counts, undirected_adjacency
from graphinfer.models.extractors.views import incompatible as _incompatible
from graphinfer.models.features import REGISTRY, Extractor, Param
from graphinfer.models.graph import GraphInput

SIMPLE_VIEW_MULTIGRAPH = "parallel edges collapse into one edge; edge attributes are not read"
SIMPLE_VIEW_SELF_LOOPS = "dropped"
SIMPLE_VIEW_DIRECTION = "ignored: u->v and v->u are the same undirected edge"


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
    cost = "O(iterations * (n + m log n)) in networkx's Python code"

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
class GraphSize(Extractor):
    """Node count and edge count of the simple undirected view."""

    name = "graph_size"
    version = 1
    task = "graph"
    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = SIMPLE_VIEW_SELF_LOOPS
    direction = SIMPLE_VIEW_DIRECTION
    cost = "O(n + m)"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        edges = int(degrees(graph_input).sum()) // 2
        return np.asarray([[graph_input.number_of_nodes, edges]], dtype=np.float64)


@REGISTRY.register
class Density(Extractor):
    """Edge density 2m / (n (n - 1)) of the simple undirected view; 0 below two nodes."""

    name = "density"
    version = 1
    task = "graph"
    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = SIMPLE_VIEW_SELF_LOOPS
    direction = SIMPLE_VIEW_DIRECTION
    cost = "O(n + m)"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        nodes = graph_input.number_of_nodes
        if nodes < 2:
            return np.zeros((1, 1), dtype=np.float64)
        edges = int(degrees(graph_input).sum()) // 2
        return np.asarray([[2.0 * edges / (nodes * (nodes - 1))]], dtype=np.float64)


@REGISTRY.register
class DegreeStatistics(Extractor):
    """Mean, standard deviation, minimum and maximum of the node degrees; zeros without nodes.

    A degree is the number of distinct neighbours in the simple undirected view.
    """

    name = "degree_statistics"
    version = 1
    task = "graph"
    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = SIMPLE_VIEW_SELF_LOOPS
    direction = SIMPLE_VIEW_DIRECTION
    cost = "O(n + m)"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        values = degrees(graph_input).astype(np.float64)
        if values.size == 0:
            return np.zeros((1, 4), dtype=np.float64)
        row = [values.mean(), values.std(), values.min(), values.max()]
        return np.asarray([row], dtype=np.float64)


@REGISTRY.register
class GraphClustering(Extractor):
    """Average local clustering coefficient and transitivity of the simple undirected view.

    The average counts nodes of degree below 2 as 0, as networkx's
    ``average_clustering`` does. Transitivity is 3 x triangles / connected
    triples. Both are 0 for graphs without triangles.
    """

    name = "graph_clustering"
    version = 1
    task = "graph"
    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = SIMPLE_VIEW_SELF_LOOPS
    direction = SIMPLE_VIEW_DIRECTION
    cost = "O(m^1.5) worst case (networkx's triangles); O(m) on sparse graphs"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        if graph_input.number_of_nodes == 0:
            return np.zeros((1, 2), dtype=np.float64)
        triangles = triangle_counts(graph_input)
        node_degrees = degrees(graph_input).astype(np.float64)
        pairs = node_degrees * (node_degrees - 1.0)
        local = np.divide(2.0 * triangles, pairs, out=np.zeros_like(pairs), where=pairs > 0)
        triples = pairs.sum()
        transitivity = 2.0 * triangles.sum() / triples if triples > 0 else 0.0
        return np.asarray([[local.mean(), transitivity]], dtype=np.float64)


@REGISTRY.register
class Components(Extractor):
    """Number of connected components, largest component's share of the nodes, and isolated nodes.

    On directed graphs the components are the weakly connected ones. All
    three are 0 for a graph without nodes.
    """

    name = "components"
    version = 1
    task = "graph"
    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = "dropped, so a node whose only edge is a self-loop counts as isolated"
    direction = "ignored: components of a directed graph are its weakly connected components"
    cost = "O(n + m)"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        nodes = graph_input.number_of_nodes
        if nodes == 0:
            return np.zeros((1, 3), dtype=np.float64)
        count, labels = connected_components(undirected_adjacency(graph_input), directed=False)
        largest = np.bincount(labels).max()
        isolated = int(np.count_nonzero(degrees(graph_input) == 0))
        return np.asarray([[count, largest / nodes, isolated]], dtype=np.float64)
