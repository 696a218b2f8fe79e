"""Tests of the graph-level extractors, including invariance to node ids and order."""

from __future__ import annotations

import random
from typing import Any

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphinfer.models.features import extract
from graphinfer.models.manifest import FeatureSpec
from tests.graphs import from_networkx, make_graph, nested, pairs_of, plain_nodes, spec


def row(graph: Any, name: str) -> list[float]:
    return extract(spec(name), graph, "graph", None)[0].tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_graph_features_match_networkx(seed: int) -> None:
    reference = nx.gnm_random_graph(40, 90, seed=seed)
    graph = from_networkx(reference)
    degrees = np.asarray([degree for _, degree in reference.degree()], dtype=np.float64)
    components = list(nx.connected_components(reference))

    assert row(graph, "graph_size") == [40.0, 90.0]
    assert row(graph, "density") == pytest.approx([nx.density(reference)], rel=1e-12)
    assert row(graph, "degree_statistics") == pytest.approx(
        [degrees.mean(), degrees.std(), degrees.min(), degrees.max()], rel=1e-12
    )
    assert row(graph, "graph_clustering") == pytest.approx(
        [nx.average_clustering(reference), nx.transitivity(reference)], rel=1e-12
    )
    assert row(graph, "components") == pytest.approx(
        [len(components), max(len(part) for part in components) / 40, nx.number_of_isolates(reference)]
    )


def test_graph_features_awkward_graph() -> None:
    edges = [(0, 1), (1, 0), (0, 1), (1, 2), (2, 0), (2, 2), (3, 3)]
    graph = make_graph(plain_nodes(5), pairs_of(edges), directed=True, multigraph=True)
    assert row(graph, "graph_size") == [5.0, 3.0]
    assert row(graph, "density") == [0.3]
    assert row(graph, "graph_clustering") == [0.6, 1.0]
    # Node 3's only edge is a self-loop, so it counts as isolated like node 4.
    assert row(graph, "components") == [3.0, 0.6, 2.0]


@pytest.mark.parametrize(
    "name", ["graph_size", "density", "degree_statistics", "graph_clustering", "components"]
)
def test_graph_features_no_nodes(name: str) -> None:
    values = extract(spec(name), make_graph([], []), "graph", None)
    assert values.shape[0] == 1
    assert not values.any()


def test_graph_concat_joins_in_order() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1)]))
    parts = [nested("graph_size"), nested("components")]
    values = extract(spec("graph_concat", parts=parts), graph, "graph", None)
    assert values.tolist() == [[3.0, 1.0, 2.0, 2 / 3, 1.0]]


# Invariance: renaming ids and reordering nodes and edges leaves graph rows unchanged.

ALL_GRAPH_FEATURES = FeatureSpec(
    name="graph_concat",
    params={
        "parts": [
            nested("graph_size"),
            nested("density"),
            nested("degree_statistics"),
            nested("graph_clustering"),
            nested("components"),
            nested("wl_histogram", dim=64),
        ]
    },
    version=1,
)


@st.composite
def graphs_and_renamings(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Draw any kind of labelled graph and the same graph with new ids in a new order.

    Graphs may be directed or multigraphs, with parallel edges and self-loops.
    """
    size = draw(st.integers(min_value=0, max_value=14))
    directed = draw(st.booleans())
    multigraph = draw(st.booleans())
    labels = draw(st.lists(st.sampled_from("CNO"), min_size=size, max_size=size))
    edges: list[tuple[int, int]] = []
    if size:
        pairs = st.tuples(st.integers(0, size - 1), st.integers(0, size - 1))
        edges = draw(st.lists(pairs, max_size=3 * size))
    if not multigraph:
        # A simple graph keeps one edge per pair, so drop repeats up front.
        seen: set[Any] = set()
        unique = []
        for u, v in edges:
            key = (u, v) if directed else frozenset((u, v))
            if key not in seen:
                seen.add(key)
                unique.append((u, v))
        edges = unique
    new_ids = draw(
        st.lists(
            st.one_of(st.integers(-1000, 1000), st.text("abcxyz", min_size=1, max_size=4)),
            min_size=size,
            max_size=size,
            unique_by=str,
        )
    )
    shuffler = random.Random(draw(st.integers(0, 2**32 - 1)))

    def graph(ids: list[Any], node_order: list[int], edge_list: list[tuple[int, int]]) -> dict[str, Any]:
        return {
            "nodes": [{"id": ids[node], "label": labels[node]} for node in node_order],
            "edges": [{"source": ids[u], "target": ids[v]} for u, v in edge_list],
            "directed": directed,
            "multigraph": multigraph,
        }

    node_order = list(range(size))
    shuffler.shuffle(node_order)
    edge_order = edges[:]
    shuffler.shuffle(edge_order)
    if not directed:
        edge_order = [(v, u) if shuffler.random() < 0.5 else (u, v) for u, v in edge_order]
    return graph(list(range(size)), list(range(size)), edges), graph(new_ids, node_order, edge_order)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(graphs_and_renamings())
def test_graph_features_invariant_to_renaming(graphs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    original, renamed = graphs
    expected = extract(ALL_GRAPH_FEATURES, make_graph(**original), "graph", None)
    values = extract(ALL_GRAPH_FEATURES, make_graph(**renamed), "graph", None)
    np.testing.assert_allclose(values, expected, rtol=1e-9, atol=0.0)
