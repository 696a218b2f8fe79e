"""Node-level extractors: one row of features per node, in ``GraphInput.node_ids`` order."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import networkx as nx
import numpy as np
import scipy.sparse as sp

from graphinfer.models.extractors.views import (
    adjacency,
    canonical_order,
    degrees,
    edge_attribute_values,
    hub_order,
    simple_graph,
    triangle_counts,
    undirected_adjacency,
)
from graphinfer.models.extractors.views import incompatible as _incompatible
from graphinfer.models.features import REGISTRY, Extractor, FullResult, Param
from graphinfer.models.graph import GraphInput

DIRECTIONS = ("any", "in", "out")
DIRECTION_PARAM = Param(
    "any",
    "choice",
    "Edges read: 'any' ignores direction; 'in' and 'out' read edges into or out of the node.",
    choices=DIRECTIONS,
)
DIRECTION_BY_PARAM = (
    "set by `direction`: 'any' ignores it; 'in' and 'out' follow it on directed graphs and "
    "equal 'any' on undirected graphs"
)
SIMPLE_VIEW_MULTIGRAPH = "parallel edges collapse into one edge; edge attributes are not read"
SIMPLE_VIEW_DIRECTION = "ignored: u->v and v->u are the same undirected edge"
# networkx's pagerank iterates until the L1 change is below n * PAGERANK_TOLERANCE.
# The change starts at 2 or less and shrinks by the factor alpha <= 0.95 per
# iteration, so it falls below 1e-10 within 470 iterations, and the limit of
# 1,000 after which networkx raises PowerIterationFailedConvergence is not reached.
PAGERANK_TOLERANCE = 1e-10
PAGERANK_MAX_ITERATIONS = 1000
ALPHA_PARAM = Param(0.85, "float", "Damping factor: the probability of following an edge.", 0.0, 0.95)


def _column(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)


def _check_finite(values: np.ndarray, weight: str | None) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise _incompatible(
            f"a weighted degree overflows to infinity with edge weights {weight!r}; scale the weights down",
            field=f"graph.edges.{weight}",
            value=None,
            limit="weighted degrees below 1.8e308",
        )
    return values


def _by_row(scores: Mapping[int, float], size: int) -> np.ndarray:
    return _column([scores[row] for row in range(size)])


@REGISTRY.register
class Degree(Extractor):
    """Number of distinct neighbours of each node, or the sum of an edge weight over its edges.

    ``direction`` 'any' reads edges either way, 'in' edges into the node and
    'out' edges out of it. With ``weight`` the value is the sum of that edge
    attribute (an edge without it counts 1), and weights may be negative.
    """

    name = "degree"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {
        "direction": DIRECTION_PARAM,
        "weight": Param(None, "str_or_null", "Edge attribute summed; null counts distinct neighbours."),
    }
    multigraph = (
        "without `weight`, parallel edges count as one neighbour; with `weight`, the weights of "
        "all parallel edges are summed"
    )
    self_loops = "dropped"
    direction = (
        DIRECTION_BY_PARAM + "; under 'any', u->v and v->u count as one neighbour, or with "
        "`weight` their weights are summed"
    )
    cost = "O(n + m)"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        direction = params["direction"]
        matrix = adjacency(
            graph_input, weight=params["weight"], directed=direction != "any", allow_negative=True
        )
        with np.errstate(over="ignore"):
            values = np.asarray(matrix.sum(axis=0 if direction == "in" else 1)).ravel()
        return _column(_check_finite(values, params["weight"]))


@REGISTRY.register
class Clustering(Extractor):
    """Local clustering coefficient 2T / (d (d - 1)) of each node; 0 below degree 2.

    T is the node's triangle count and d its number of distinct neighbours
    in the simple undirected view, which equals networkx's unweighted
    ``clustering``. networkx's own ``clustering`` takes quadratic time on a
    star, so it is not called.
    """

    name = "clustering"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = "dropped"
    direction = SIMPLE_VIEW_DIRECTION
    cost = "O(m^1.5) worst case (networkx's triangles); O(m) on sparse graphs"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        node_degrees = degrees(graph_input).astype(np.float64)
        pairs = node_degrees * (node_degrees - 1.0)
        triangles = triangle_counts(graph_input)
        return _column(np.divide(2.0 * triangles, pairs, out=np.zeros_like(pairs), where=pairs > 0))


@REGISTRY.register
class Triangles(Extractor):
    """Number of triangles through each node in the simple undirected view."""

    name = "triangles"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = "dropped"
    direction = SIMPLE_VIEW_DIRECTION
    cost = "O(m^1.5) worst case (networkx's triangles); O(m) on sparse graphs"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        return _column(triangle_counts(graph_input))


@REGISTRY.register
class PageRank(Extractor):
    """PageRank of each node (networkx ``pagerank``), summing to 1 over the graph.

    With ``directed`` true a directed graph's edges are followed in their
    direction; otherwise, and on undirected graphs, the walk ignores it. With
    ``weight`` the walk follows an edge in proportion to that attribute.
    """

    name = "pagerank"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {
        "alpha": ALPHA_PARAM,
        "weight": Param(
            None, "str_or_null", "Edge attribute read as non-negative weight; null: every edge 1."
        ),
        "directed": Param(False, "bool", "Follow edge direction on directed graphs."),
    }
    multigraph = "parallel edges collapse into one edge of weight 1, or of their summed weights with `weight`"
    self_loops = "dropped"
    direction = (
        "ignored unless `directed` is true; then followed on directed graphs, and with `weight` "
        "u->v and v->u keep their own weights"
    )
    cost = (
        "O(m * iterations), about log(n * 1e-10) / log(alpha) iterations (about 80 at alpha 0.85), "
        "at most 1,000"
    )

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        size = graph_input.number_of_nodes
        if size == 0:
            return np.zeros((0, 1), dtype=np.float64)
        graph = simple_graph(graph_input, weight=params["weight"], directed=params["directed"])
        scores = nx.pagerank(
            graph,
            alpha=params["alpha"],
            weight="weight" if params["weight"] else None,
            tol=PAGERANK_TOLERANCE,
            max_iter=PAGERANK_MAX_ITERATIONS,
        )
        return _by_row(scores, size)


@REGISTRY.register
class CoreNumber(Extractor):
    """k-core number of each node (networkx ``core_number``) in the simple undirected view."""

    name = "core_number"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = "dropped (networkx 3.6.1 raises on them)"
    direction = SIMPLE_VIEW_DIRECTION
    cost = "O(n + m)"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        size = graph_input.number_of_nodes
        return _by_row(nx.core_number(simple_graph(graph_input)), size)


@REGISTRY.register
class Betweenness(Extractor):
    """Betweenness centrality of each node, estimated from at most ``pivots`` source nodes.

    The pivots are the first ``pivots`` nodes in a canonical order that does
    not depend on ids: sorted by a digest of their Weisfeiler-Lehman colour
    and ``seed``, with ties broken by id text (see ``views.canonical_order``).
    With n at most ``pivots`` every node is a pivot and the result is exact.

    Shortest paths are counted from each pivot to every node with networkx's
    ``betweenness_centrality_subset`` (Brandes' algorithm) and scaled by
    n / pivots, which estimates the exact value without bias when pivots are
    a uniform sample. ``normalized`` divides by (n - 1)(n - 2) / 2, the pairs
    that can pass through a node.
    """

    name = "betweenness"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {
        "pivots": Param(16, "int", "Number of source nodes k; the cost grows linearly with it.", 1, 4096),
        "seed": Param(0, "int", "Seed of the pivot order.", 0, 2**32 - 1),
        "normalized": Param(True, "bool", "Divide by (n - 1)(n - 2) / 2."),
    }
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = "dropped"
    direction = SIMPLE_VIEW_DIRECTION + "; shortest paths are unweighted"
    cost = "O(min(k, n) * (n + m)) for k = pivots: one breadth-first search per pivot"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        size = graph_input.number_of_nodes
        if size == 0:
            return np.zeros((0, 1), dtype=np.float64)
        sources = canonical_order(graph_input, params["seed"])[: params["pivots"]].tolist()
        # Undirected path counts come back halved, so each unordered pair counts once.
        halved = nx.betweenness_centrality_subset(
            simple_graph(graph_input), sources=sources, targets=range(size), normalized=False
        )
        values = _by_row(halved, size) * (size / len(sources))
        if params["normalized"] and size > 2:
            values *= 2.0 / ((size - 1) * (size - 2))
        return values


@REGISTRY.register
class AnchorPageRank(Extractor):
    """Personalised PageRank from each of the ``anchors`` highest-degree nodes: one column per anchor.

    Anchors are ranked by degree in the simple undirected view, then by
    Weisfeiler-Lehman colour, then by id text (see ``views.hub_order``), so
    column i measures how close each node is to the graph's i-th hub. A graph
    with fewer nodes than anchors gets zero columns for the missing ones.
    """

    name = "anchor_pagerank"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {
        "anchors": Param(2, "int", "Number of hub anchors, one column each.", 1, 16),
        "alpha": ALPHA_PARAM,
        "weight": Param(
            None, "str_or_null", "Edge attribute read as non-negative weight; null: every edge 1."
        ),
    }
    multigraph = "parallel edges collapse into one edge of weight 1, or of their summed weights with `weight`"
    self_loops = "dropped"
    direction = SIMPLE_VIEW_DIRECTION
    cost = "O(anchors * m * iterations), iterations as for pagerank"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        size = graph_input.number_of_nodes
        columns = np.zeros((size, params["anchors"]), dtype=np.float64)
        if size == 0:
            return columns
        graph = simple_graph(graph_input, weight=params["weight"])
        for column, anchor in enumerate(hub_order(graph_input)[: params["anchors"]].tolist()):
            scores = nx.pagerank(
                graph,
                alpha=params["alpha"],
                personalization={anchor: 1.0},
                weight="weight" if params["weight"] else None,
                tol=PAGERANK_TOLERANCE,
                max_iter=PAGERANK_MAX_ITERATIONS,
            )
            columns[:, column] = _by_row(scores, size).ravel()
        return columns


@REGISTRY.register
class NodeAttributes(Extractor):
    """Numeric node attributes as columns, in the order of ``attributes``.

    Numbers are read as floats and booleans as 0 or 1. A missing or null
    value takes ``default``, or is an error when ``default`` is null; any
    other value (text, a list) is an error.
    """

    name = "node_attributes"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {
        "attributes": Param(["value"], "str_list", "Node attributes to read, one column each."),
        "default": Param(None, "float_or_null", "Value for a missing attribute; null makes it an error."),
    }
    multigraph = "edges are not read"
    self_loops = "edges are not read"
    direction = "edges are not read"
    cost = "O(n * attributes)"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        attributes = params["attributes"]
        columns = np.zeros((graph_input.number_of_nodes, len(attributes)), dtype=np.float64)
        for row, node in enumerate(graph_input.node_ids):
            data = graph_input.graph.nodes[node]
            for column, attribute in enumerate(attributes):
                columns[row, column] = self._value(node, attribute, data.get(attribute), params["default"])
        return columns

    def _value(self, node: Any, attribute: str, value: Any, default: float | None) -> float:
        if value is None and default is not None:
            return default
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
        reason = "lacks it" if value is None else f"has {value!r}"
        raise _incompatible(
            f"{self.label} reads node attribute {attribute!r} as a number, but node {node!r} {reason}; "
            f"give every node a finite number as {attribute!r}",
            field=f"graph.nodes.{attribute}",
            value=node,
            limit="a finite number or boolean",
        )


@REGISTRY.register
class EdgeAttributeStatistics(Extractor):
    """Statistics of a numeric edge attribute over each node's edges, such as the ratings it received.

    Seven columns: count, sum, mean, minimum, maximum, population standard
    deviation and the fraction of negative values. A node without such
    edges gets zeros. Every edge must carry the attribute as a finite number.
    """

    name = "edge_attribute_statistics"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {
        "attribute": Param("weight", "str", "Numeric edge attribute to summarise."),
        "direction": DIRECTION_PARAM,
    }
    multigraph = "each parallel edge is one value"
    self_loops = "dropped"
    direction = DIRECTION_BY_PARAM + "; under 'any' an edge counts once at each end"
    cost = "O(n + m)"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        size = graph_input.number_of_nodes
        rows, cols, values = edge_attribute_values(graph_input, params["attribute"])
        direction = params["direction"]
        if not graph_input.directed or direction == "any":
            ends = np.concatenate([rows, cols])
            values = np.concatenate([values, values])
        else:
            ends = cols if direction == "in" else rows

        count = np.bincount(ends, minlength=size).astype(np.float64)
        total = np.bincount(ends, weights=values, minlength=size)
        mean = np.divide(total, count, out=np.zeros(size), where=count > 0)
        squares = np.bincount(ends, weights=(values - mean[ends]) ** 2, minlength=size)
        std = np.sqrt(np.divide(squares, count, out=np.zeros(size), where=count > 0))
        negative = np.bincount(ends, weights=(values < 0).astype(np.float64), minlength=size)
        minimum = np.full(size, np.inf)
        maximum = np.full(size, -np.inf)
        np.minimum.at(minimum, ends, values)
        np.maximum.at(maximum, ends, values)
        empty = count == 0
        minimum[empty] = 0.0
        maximum[empty] = 0.0
        fraction = np.divide(negative, count, out=np.zeros(size), where=count > 0)
        return np.column_stack([count, total, mean, minimum, maximum, std, fraction])


@REGISTRY.register
class NeighbourMean(Extractor):
    """Mean of another node extractor's rows over each node's distinct neighbours.

    ``base`` names the node extractor. A node without neighbours in the
    chosen ``direction`` gets a row of zeros.
    """

    name = "neighbor_mean"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {
        "base": Param({"name": "degree", "version": 1}, "spec", "Node extractor to average.", task="node"),
        "direction": DIRECTION_PARAM,
    }
    multigraph = "parallel edges collapse: each neighbour counts once"
    self_loops = "dropped: a node is not its own neighbour"
    direction = DIRECTION_BY_PARAM + "; 'out' averages the nodes a node points to, 'in' those pointing to it"
    cost = "O(m * width of base) plus the cost of base"

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> FullResult:
        assert self.registry is not None
        base = self.registry.full_result(params["base"], graph_input)
        matrix = adjacency(graph_input, directed=params["direction"] != "any")
        if params["direction"] == "in":
            matrix = matrix.T.tocsr()
        counts = np.diff(matrix.indptr).astype(np.float64)
        scale = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
        averaging = sp.csr_matrix(sp.diags(scale) @ matrix)
        if sp.issparse(base):
            return sp.csr_matrix(averaging @ base)
        return np.asarray(averaging @ np.asarray(base, dtype=np.float64))


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
    cost = "O(hops * (m + nnz(X)) * d) for feature dimension d, in scipy sparse products"

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
