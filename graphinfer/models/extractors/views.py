"""Derived forms of a request's graph that several extractors read, each built once per graph.

Every view is kept in ``GraphInput.cache`` under a key starting with
``views/``, so the extractors of all models on one request share it. Rows
and columns of every matrix follow ``GraphInput.node_ids`` (the request's
node order), and networkx graphs built here use those row numbers as node
names.

The simple views collapse what networkx 3.6.1 rejects in several algorithms:
parallel edges become one edge (their weights summed when a weight attribute
is read), self-loops are dropped, and the undirected views treat u->v and
v->u as one edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp

from graphinfer.errors import ErrorDetail, GraphinferError
from graphinfer.models.graph import GraphInput

VIEW_PREFIX = "views"
# Colour refinement stops once a round splits no class, or after this many rounds.
MAX_REFINEMENT_ROUNDS = 16


def incompatible(message: str, *, field: str, value: Any, limit: Any) -> GraphinferError:
    """Build the ``incompatible_input`` error that extractors raise for graphs they cannot read."""
    return GraphinferError(message, code="incompatible_input", details=[ErrorDetail(field, value, limit)])


def _cached(graph_input: GraphInput, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    full_key = (VIEW_PREFIX, *key)
    value = graph_input.cache.get(full_key)
    if value is None:
        value = build()
        graph_input.cache[full_key] = value
    return value


def edge_arrays(
    graph_input: GraphInput, weight: str | None, *, allow_negative: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(rows, cols, values)`` for every edge except self-loops, once per parallel edge.

    ``rows`` and ``cols`` are the source and target rows. With ``weight``
    None every value is 1. Otherwise a value is the edge's ``weight``
    attribute, 1 when the edge lacks it. Raises ``incompatible_input`` for a
    value that is not a finite number, or that is negative unless
    ``allow_negative``.
    """
    arrays = _cached(graph_input, ("edges", weight), lambda: _read_edges(graph_input, weight))
    rows, cols, values = arrays
    if not allow_negative and weight is not None and values.size and values.min() < 0:
        position = int(np.argmax(values < 0))
        u, v = graph_input.node_ids[rows[position]], graph_input.node_ids[cols[position]]
        raise _invalid_weight(u, v, weight, float(values[position]))
    return arrays


def _read_edges(graph_input: GraphInput, weight: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = graph_input.index
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    if weight is None:
        for u, v in graph_input.graph.edges():
            if u != v:
                rows.append(index[u])
                cols.append(index[v])
        values = [1.0] * len(rows)
    else:
        for u, v, value in graph_input.graph.edges(data=weight, default=1.0):
            if u == v:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise _invalid_weight(u, v, weight, value)
            rows.append(index[u])
            cols.append(index[v])
            values.append(float(value))
    return (
        np.asarray(rows, dtype=np.int64),
        np.asarray(cols, dtype=np.int64),
        np.asarray(values, dtype=np.float64),
    )


def _invalid_weight(u: Hashable, v: Hashable, weight: str, value: Any) -> GraphinferError:
    return incompatible(
        f"edge ({u!r}, {v!r}) has {weight!r} = {value!r}; edge weights read as "
        f"{weight!r} must be finite non-negative numbers",
        field=f"graph.edges.{weight}",
        value=value,
        limit="a finite number >= 0",
    )


def adjacency(
    graph_input: GraphInput,
    *,
    weight: str | None = None,
    directed: bool = False,
    allow_negative: bool = False,
) -> sp.csr_matrix:
    """Return the adjacency matrix of the simple view, without self-loops.

    With ``directed`` false, or on an undirected graph, the matrix is
    symmetric and entry (u, v) sums every edge between u and v in either
    direction. With ``directed`` true on a directed graph, entry (u, v) sums
    the edges u->v only. With ``weight`` None every non-zero entry is 1.
    Sums of huge weights may overflow to infinity; callers that divide by
    them check.
    """
    # Reading the edges first raises for negative weights even when the matrix is cached.
    edges = edge_arrays(graph_input, weight, allow_negative=allow_negative)
    symmetric = not (directed and graph_input.directed)
    return _cached(
        graph_input,
        ("adjacency", weight, symmetric),
        lambda: _build_adjacency(
            graph_input.number_of_nodes, edges, weighted=weight is not None, symmetric=symmetric
        ),
    )


def _build_adjacency(
    size: int, edges: tuple[np.ndarray, np.ndarray, np.ndarray], *, weighted: bool, symmetric: bool
) -> sp.csr_matrix:
    rows, cols, values = edges
    one_way = sp.coo_matrix((values, (rows, cols)), shape=(size, size))
    # Huge weights may overflow to infinity here, and callers that divide by the sums check for it.
    with np.errstate(over="ignore"):
        matrix = (one_way + one_way.T).tocsr() if symmetric else one_way.tocsr()
        matrix.sum_duplicates()
    if not weighted:
        matrix.data[:] = 1.0
    matrix.sort_indices()
    return matrix


def undirected_adjacency(graph_input: GraphInput, weight: str | None = None) -> sp.csr_matrix:
    """Build the symmetric adjacency matrix in ``node_ids`` order, without self-loops.

    With ``weight`` None every linked pair gets 1, however many edges join it
    in either direction. With ``weight`` set, entry (u, v) is the sum of that
    attribute over all edges between u and v in either direction, and an edge
    without the attribute counts 1. Weights must be finite and non-negative.
    """
    return adjacency(graph_input, weight=weight)


def degrees(graph_input: GraphInput) -> np.ndarray:
    """Return each node's number of distinct neighbours in the undirected simple view."""
    return _cached(
        graph_input, ("degrees",), lambda: np.diff(undirected_adjacency(graph_input).indptr).astype(np.int64)
    )


def neighbour_sets(graph_input: GraphInput) -> list[set[int]]:
    """Return each node's distinct neighbours (rows) in the undirected simple view."""

    def build() -> list[set[int]]:
        matrix = undirected_adjacency(graph_input)
        indptr, indices = matrix.indptr, matrix.indices.tolist()
        return [set(indices[indptr[row] : indptr[row + 1]]) for row in range(matrix.shape[0])]

    return _cached(graph_input, ("neighbour_sets",), build)


def simple_graph(graph_input: GraphInput, weight: str | None = None, directed: bool = False) -> nx.Graph:
    """Return the simple view as a networkx graph whose nodes are the rows 0..n-1.

    Undirected unless ``directed`` is true and the request's graph is
    directed. With ``weight`` set, each edge carries the summed weight as
    ``weight``; weights must be non-negative.
    """

    def build() -> nx.Graph:
        matrix = adjacency(graph_input, weight=weight, directed=directed)
        graph: nx.Graph = nx.DiGraph() if directed and graph_input.directed else nx.Graph()
        graph.add_nodes_from(range(graph_input.number_of_nodes))
        coo = matrix.tocoo()
        if weight is None:
            graph.add_edges_from(zip(coo.row.tolist(), coo.col.tolist(), strict=True))
        else:
            graph.add_weighted_edges_from(
                zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist(), strict=True)
            )
        return graph

    return _cached(graph_input, ("simple_graph", weight, directed and graph_input.directed), build)


def id_text_rank(graph_input: GraphInput) -> np.ndarray:
    """Return each node's rank when ids are sorted by (type name, text), the last tie-breaker."""

    def build() -> np.ndarray:
        keys = [(type(node_id).__name__, str(node_id)) for node_id in graph_input.node_ids]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        ranks = np.empty(len(keys), dtype=np.int64)
        ranks[np.asarray(order, dtype=np.int64)] = np.arange(len(keys), dtype=np.int64)
        return ranks

    return _cached(graph_input, ("id_text_rank",), build)


def mix64(values: np.ndarray) -> np.ndarray:
    """Scramble unsigned 64-bit integers with the splitmix64 finaliser.

    A fixed arithmetic function, so colours and orders built from it are the
    same in every process and on every platform, unlike Python's ``hash()``.
    """
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def structural_colours(graph_input: GraphInput) -> np.ndarray:
    """Return a 64-bit Weisfeiler-Lehman colour per node that does not depend on ids or order.

    Colour refinement on the undirected simple view: the first colour is the
    degree, and each round combines a node's colour with the multiset of its
    neighbours' colours (a wrapping sum of scrambled values). Refinement stops
    when a round splits no class, or after ``MAX_REFINEMENT_ROUNDS`` rounds.
    Each round costs O(n + m) in numpy.
    """

    def build() -> np.ndarray:
        matrix = undirected_adjacency(graph_input)
        colours = mix64(degrees(graph_input).astype(np.uint64))
        classes = len(np.unique(colours))
        for _ in range(MAX_REFINEMENT_ROUNDS):
            scrambled = mix64(colours ^ np.uint64(0x5851F42D4C957F2D))[matrix.indices]
            # Row sums come from one cumulative sum. uint64 arithmetic wraps, which
            # keeps each row's difference exact modulo 2**64.
            running = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(scrambled, dtype=np.uint64)])
            neighbour_sums = running[matrix.indptr[1:]] - running[matrix.indptr[:-1]]
            refined = mix64(mix64(colours) ^ neighbour_sums)
            refined_classes = len(np.unique(refined))
            colours = refined
            if refined_classes == classes:
                break
            classes = refined_classes
        return colours

    return _cached(graph_input, ("structural_colours",), build)


def canonical_order(graph_input: GraphInput, seed: int) -> np.ndarray:
    """Return the rows in a pseudo-random order that depends on structure and ``seed``, not on ids.

    Nodes are sorted by a seeded scramble of their :func:`structural_colours`.
    Nodes of equal colour are ordered by :func:`id_text_rank`, the only step
    that reads ids. Such nodes are usually automorphic (for example the leaves
    of a star), and then the choice among them does not change a graph-level
    result.
    """
    seed_mix = mix64(np.asarray([seed], dtype=np.uint64))[0]
    keys = mix64(structural_colours(graph_input) ^ seed_mix)
    return np.lexsort((id_text_rank(graph_input), keys))


def hub_order(graph_input: GraphInput) -> np.ndarray:
    """Return the rows by decreasing degree, then by structural colour, then by id text."""
    keys = mix64(structural_colours(graph_input))
    return np.lexsort((id_text_rank(graph_input), keys, -degrees(graph_input)))


def triangle_counts(graph_input: GraphInput) -> np.ndarray:
    """Return each node's number of triangles in the undirected simple view (networkx's ``triangles``)."""

    def build() -> np.ndarray:
        counts = nx.triangles(simple_graph(graph_input))
        return np.asarray([counts[row] for row in range(graph_input.number_of_nodes)], dtype=np.float64)

    return _cached(graph_input, ("triangles",), build)


def edge_attribute_values(
    graph_input: GraphInput, attribute: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(rows, cols, values)`` of a numeric edge attribute, once per edge except self-loops.

    Unlike :func:`edge_arrays`, an edge without the attribute is an error:
    raises ``incompatible_input`` naming the first such edge, or the first
    value that is not a finite number. Negative values are accepted.
    """

    def build() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index = graph_input.index
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for u, v, value in graph_input.graph.edges(data=attribute, default=None):
            if u == v:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                reason = "lacks it" if value is None else f"has {value!r}"
                raise incompatible(
                    f"edge ({u!r}, {v!r}) {reason}, but the model reads edge attribute {attribute!r}; "
                    f"give every edge a finite number as {attribute!r}",
                    field=f"graph.edges.{attribute}",
                    value=value,
                    limit="a finite number",
                )
            rows.append(index[u])
            cols.append(index[v])
            values.append(float(value))
        return (
            np.asarray(rows, dtype=np.int64),
            np.asarray(cols, dtype=np.int64),
            np.asarray(values, dtype=np.float64),
        )

    return _cached(graph_input, ("edge_attribute", attribute), build)
