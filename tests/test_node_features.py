"""Tests of the node-level extractors on awkward graphs and against networkx."""

from __future__ import annotations

import random
from typing import Any

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphinfer.errors import GraphinferError
from graphinfer.models.features import extract
from graphinfer.models.graph import GraphInput
from tests.graphs import from_networkx, make_graph, nested, pairs_of, plain_nodes, spec

# A directed multigraph with a reciprocal pair, parallel edges, a self-loop and an isolated node.
AWKWARD_EDGES = [
    {"source": 0, "target": 1, "weight": 2.0},
    {"source": 0, "target": 1, "weight": 3.0},
    {"source": 1, "target": 0, "weight": 4.0},
    {"source": 1, "target": 2},
    {"source": 2, "target": 2, "weight": 9.0},
    {"source": 2, "target": 3, "weight": 1.0},
]


def awkward_graph() -> GraphInput:
    return make_graph(plain_nodes(5), AWKWARD_EDGES, directed=True, multigraph=True)


def column(graph: GraphInput, name: str, **params: Any) -> list[float]:
    return extract(spec(name, **params), graph, "node", None)[:, 0].tolist()


def random_simple_graph(seed: int, nodes: int = 30, edges: int = 70) -> nx.Graph:
    return nx.gnm_random_graph(nodes, edges, seed=seed)


# Degree.


def test_degree_counts_distinct_neighbours() -> None:
    assert column(awkward_graph(), "degree") == [1.0, 2.0, 2.0, 1.0, 0.0]


def test_degree_in_and_out() -> None:
    graph = awkward_graph()
    assert column(graph, "degree", direction="in") == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert column(graph, "degree", direction="out") == [1.0, 2.0, 1.0, 0.0, 0.0]


def test_degree_weighted_sums_parallel_edges() -> None:
    graph = awkward_graph()
    # Node 1: 2 + 3 + 4 between 0 and 1, plus 1 for the unweighted edge to 2.
    assert column(graph, "degree", weight="weight") == [9.0, 10.0, 2.0, 1.0, 0.0]
    assert column(graph, "degree", weight="weight", direction="in") == [4.0, 5.0, 1.0, 1.0, 0.0]


def test_degree_accepts_negative_weights() -> None:
    graph = make_graph(plain_nodes(2), [{"source": 0, "target": 1, "rating": -3}], directed=True)
    assert column(graph, "degree", weight="rating", direction="in") == [0.0, -3.0]


def test_degree_undirected_ignores_direction_param() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (1, 2)]))
    assert column(graph, "degree", direction="in") == column(graph, "degree", direction="out")


def test_degree_rejects_text_weight() -> None:
    graph = make_graph(plain_nodes(2), [{"source": 0, "target": 1, "strength": "heavy"}])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("degree", weight="strength"), graph, "node", None)
    assert caught.value.code == "incompatible_input"


def test_degree_overflowing_weights_rejected() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (0, 2)], weight=1e308))
    with pytest.raises(GraphinferError) as caught:
        extract(spec("degree", weight="weight"), graph, "node", None)
    assert caught.value.code == "incompatible_input"


# Clustering, triangles and core number against networkx on simple graphs.


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_matches_networkx(seed: int) -> None:
    reference = random_simple_graph(seed)
    expected = nx.clustering(reference)
    values = column(from_networkx(reference), "clustering")
    np.testing.assert_allclose(values, [expected[node] for node in reference], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triangles_matches_networkx(seed: int) -> None:
    reference = random_simple_graph(seed)
    expected = nx.triangles(reference)
    assert column(from_networkx(reference), "triangles") == [float(expected[node]) for node in reference]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_core_number_matches_networkx(seed: int) -> None:
    reference = random_simple_graph(seed)
    expected = nx.core_number(reference)
    assert column(from_networkx(reference), "core_number") == [float(expected[node]) for node in reference]


def test_clustering_multigraph_equals_simple_view() -> None:
    edges = [(0, 1), (1, 2), (2, 0), (2, 3)]
    simple = make_graph(plain_nodes(4), pairs_of(edges))
    multi = make_graph(
        plain_nodes(4), pairs_of([*edges, (1, 0), (2, 2), (3, 2)]), directed=True, multigraph=True
    )
    assert column(multi, "clustering") == column(simple, "clustering")
    assert column(multi, "triangles") == [1.0, 1.0, 1.0, 0.0]


def test_core_number_with_self_loops() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (1, 2), (2, 0), (0, 0)]), multigraph=True)
    assert column(graph, "core_number") == [2.0, 2.0, 2.0]


def test_clustering_star_is_fast_and_zero() -> None:
    # networkx's own clustering takes quadratic time on a star.
    graph = from_networkx(nx.star_graph(19_999))
    assert max(column(graph, "clustering")) == 0.0


# PageRank.


def test_pagerank_matches_networkx_undirected() -> None:
    reference = random_simple_graph(3)
    expected = nx.pagerank(reference, tol=1e-12)
    values = column(from_networkx(reference), "pagerank")
    np.testing.assert_allclose(values, [expected[node] for node in reference], rtol=1e-6)


def test_pagerank_directed_follows_edges() -> None:
    reference = nx.gnm_random_graph(20, 60, seed=4, directed=True)
    expected = nx.pagerank(reference, tol=1e-12)
    values = column(from_networkx(reference), "pagerank", directed=True)
    np.testing.assert_allclose(values, [expected[node] for node in reference], rtol=1e-6)


def test_pagerank_weighted_sums_to_one() -> None:
    values = column(awkward_graph(), "pagerank", weight="weight", directed=True)
    assert sum(values) == pytest.approx(1.0)
    assert values[0] > values[4]


def test_pagerank_rejects_negative_weight() -> None:
    graph = make_graph(plain_nodes(2), [{"source": 0, "target": 1, "weight": -1.0}])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("pagerank", weight="weight"), graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "-1.0" in caught.value.message


def test_pagerank_invalid_alpha() -> None:
    graph = make_graph(plain_nodes(2), [])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("pagerank", alpha=0.99), graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "a number >= 0.0 and <= 0.95" in caught.value.message


# Betweenness.


@pytest.mark.parametrize("normalized", [True, False])
def test_betweenness_exact_when_pivots_cover(normalized: bool) -> None:
    reference = random_simple_graph(5)
    expected = nx.betweenness_centrality(reference, normalized=normalized)
    values = column(from_networkx(reference), "betweenness", pivots=64, normalized=normalized)
    np.testing.assert_allclose(values, [expected[node] for node in reference], rtol=1e-12, atol=1e-15)


def test_betweenness_sampled_star_centre() -> None:
    size = 2_000
    values = column(from_networkx(nx.star_graph(size - 1)), "betweenness", pivots=16)
    # Each leaf pivot gives the centre its exact share; a centre pivot gives it nothing.
    assert 15 / 16 <= values[0] <= 1.0
    assert max(values[1:]) == 0.0


def test_betweenness_sampled_estimate_correlates() -> None:
    reference = nx.barabasi_albert_graph(400, 3, seed=1)
    exact = nx.betweenness_centrality(reference)
    values = np.asarray(column(from_networkx(reference), "betweenness", pivots=128))
    expected = np.asarray([exact[node] for node in reference])
    assert np.corrcoef(values, expected)[0, 1] > 0.95
    assert values.sum() == pytest.approx(expected.sum(), rel=0.1)


def test_betweenness_seed_changes_pivots() -> None:
    graph = from_networkx(nx.barabasi_albert_graph(300, 2, seed=2))
    first = column(graph, "betweenness", pivots=8, seed=0)
    second = column(graph, "betweenness", pivots=8, seed=1)
    assert first != second


@st.composite
def reordered_graphs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Draw a graph and the same graph with nodes and edges listed in another order."""
    size = draw(st.integers(min_value=1, max_value=40))
    pairs = st.tuples(st.integers(0, size - 1), st.integers(0, size - 1))
    edges = draw(st.lists(pairs, max_size=3 * size))
    shuffler = random.Random(draw(st.integers(0, 2**32 - 1)))
    nodes = [{"id": f"n{node}"} for node in range(size)]
    edge_objects = [{"source": f"n{u}", "target": f"n{v}"} for u, v in edges]
    shuffled_nodes, shuffled_edges = nodes[:], edge_objects[:]
    shuffler.shuffle(shuffled_nodes)
    shuffler.shuffle(shuffled_edges)
    original = {"nodes": nodes, "edges": edge_objects, "multigraph": True}
    return original, {"nodes": shuffled_nodes, "edges": shuffled_edges, "multigraph": True}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(reordered_graphs())
def test_betweenness_sampled_invariant_to_order(graphs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    original, reordered = graphs
    betweenness = spec("betweenness", pivots=5)
    first, second = make_graph(**original), make_graph(**reordered)
    by_id = dict(zip(second.node_ids, extract(betweenness, second, "node", None)[:, 0], strict=True))
    expected = extract(betweenness, first, "node", None)[:, 0]
    np.testing.assert_allclose([by_id[node] for node in first.node_ids], expected, rtol=1e-9, atol=1e-12)


# Anchor PageRank.


def test_anchor_pagerank_first_anchor_is_hub() -> None:
    graph = from_networkx(nx.star_graph(10))
    values = extract(spec("anchor_pagerank", anchors=1), graph, "node", None)
    assert int(np.argmax(values[:, 0])) == 0


def test_anchor_pagerank_columns_follow_degree() -> None:
    # Node 0 has degree 3 and node 4 degree 2; each column peaks at its anchor.
    graph = make_graph(plain_nodes(7), pairs_of([(0, 1), (0, 2), (0, 3), (4, 5), (4, 6), (3, 4)]))
    values = extract(spec("anchor_pagerank", anchors=2), graph, "node", None)
    assert [int(np.argmax(values[:, column])) for column in range(2)] == [0, 4]


def test_anchor_pagerank_fewer_nodes_than_anchors() -> None:
    graph = make_graph(plain_nodes(2), pairs_of([(0, 1)]))
    values = extract(spec("anchor_pagerank", anchors=3), graph, "node", None)
    assert values.shape == (2, 3)
    assert values[:, 2].tolist() == [0.0, 0.0]


def test_anchor_pagerank_karate_leaders() -> None:
    graph = from_networkx(nx.karate_club_graph())
    values = extract(spec("anchor_pagerank", anchors=2), graph, "node", None)
    assert [int(np.argmax(values[:, column])) for column in range(2)] == [33, 0]


# Node attributes.


def test_node_attributes_numbers_and_booleans() -> None:
    graph = make_graph([{"id": "a", "age": 3, "vip": True}, {"id": "b", "age": 4.5, "vip": False}], [])
    values = extract(spec("node_attributes", attributes=["age", "vip"]), graph, "node", None)
    assert values.tolist() == [[3.0, 1.0], [4.5, 0.0]]


def test_node_attributes_default_fills_missing() -> None:
    graph = make_graph([{"id": "a", "age": 3}, {"id": "b"}], [])
    values = extract(spec("node_attributes", attributes=["age"], default=-1), graph, "node", None)
    assert values.tolist() == [[3.0], [-1.0]]


def test_node_attributes_missing_rejected() -> None:
    graph = make_graph([{"id": "a", "age": 3}, {"id": "b"}], [])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("node_attributes", attributes=["age"]), graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "'b'" in caught.value.message


def test_node_attributes_text_rejected() -> None:
    graph = make_graph([{"id": "a", "age": "old"}], [])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("node_attributes", attributes=["age"], default=0.0), graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "'old'" in caught.value.message


def test_node_attributes_duplicate_names_rejected() -> None:
    graph = make_graph([{"id": "a", "age": 3}], [])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("node_attributes", attributes=["age", "age"]), graph, "node", None)
    assert caught.value.code == "incompatible_input"


# Edge attribute statistics.

RATINGS = [
    {"source": 0, "target": 1, "rating": 4},
    {"source": 2, "target": 1, "rating": -2},
    {"source": 1, "target": 2, "rating": 10},
    {"source": 1, "target": 1, "rating": -10},
]


def statistics(direction: str, *, directed: bool = True) -> np.ndarray:
    graph = make_graph(plain_nodes(4), RATINGS, directed=directed)
    return extract(
        spec("edge_attribute_statistics", attribute="rating", direction=direction), graph, "node", None
    )


def test_edge_statistics_incoming_values() -> None:
    # Node 1 received 4 and -2; the self-rating is dropped.
    assert statistics("in")[1].tolist() == [2.0, 2.0, 1.0, -2.0, 4.0, 3.0, 0.5]


def test_edge_statistics_outgoing_values() -> None:
    assert statistics("out")[1].tolist() == [1.0, 10.0, 10.0, 10.0, 10.0, 0.0, 0.0]


def test_edge_statistics_node_without_edges() -> None:
    assert statistics("any")[3].tolist() == [0.0] * 7


def test_edge_statistics_undirected_counts_both_ends() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (1, 2)], rating=1))
    for direction in ("in", "out", "any"):
        values = extract(
            spec("edge_attribute_statistics", attribute="rating", direction=direction), graph, "node", None
        )
        assert values[:, 0].tolist() == [1.0, 2.0, 1.0], direction


def test_edge_statistics_missing_attribute() -> None:
    graph = make_graph(plain_nodes(3), [*RATINGS[:2], {"source": 0, "target": 2}], directed=True)
    with pytest.raises(GraphinferError) as caught:
        extract(spec("edge_attribute_statistics", attribute="rating"), graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "(0, 2)" in caught.value.message


def test_edge_statistics_multigraph_counts_each_edge() -> None:
    edges = [{"source": 0, "target": 1, "rating": 1}, {"source": 0, "target": 1, "rating": 3}]
    graph = make_graph(plain_nodes(2), edges, directed=True, multigraph=True)
    values = extract(
        spec("edge_attribute_statistics", attribute="rating", direction="in"), graph, "node", None
    )
    assert values[1, :3].tolist() == [2.0, 4.0, 2.0]


# Neighbour means.


def test_neighbor_mean_of_degree() -> None:
    graph = make_graph(plain_nodes(4), pairs_of([(0, 1), (0, 2), (0, 3)]))
    assert column(graph, "neighbor_mean") == [1.0, 3.0, 3.0, 3.0]


def test_neighbor_mean_direction_out() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (1, 2), (2, 1)]), directed=True)
    in_degree = nested("degree", direction="in")
    assert column(graph, "neighbor_mean", base=in_degree, direction="out") == [2.0, 1.0, 2.0]
    assert column(graph, "neighbor_mean", base=in_degree, direction="in") == [0.0, 0.5, 2.0]


def test_neighbor_mean_isolated_node_zero() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1)]))
    assert column(graph, "neighbor_mean")[2] == 0.0


def test_neighbor_mean_sparse_base() -> None:
    nodes = [{"id": node, "features": [float(node), 1.0]} for node in range(3)]
    graph = make_graph(nodes, pairs_of([(0, 1), (1, 2)]))
    base = nested("sgc", hops=0)
    values = extract(spec("neighbor_mean", base=base), graph, "node", None)
    assert values.tolist() == [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]


def test_neighbor_mean_rejects_edge_base() -> None:
    graph = make_graph(plain_nodes(2), [])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("neighbor_mean", base=nested("wl_histogram")), graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "node extractor" in caught.value.message


# Node concatenation.


def test_node_concat_joins_columns_in_order() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (1, 2)]))
    parts = [nested("degree"), nested("triangles"), nested("core_number")]
    values = extract(spec("node_concat", parts=parts), graph, "node", [1])
    assert values.tolist() == [[2.0, 0.0, 1.0]]


def test_node_concat_with_sparse_part() -> None:
    nodes = [{"id": node, "features": {"indices": [node], "values": [1.0], "dim": 3}} for node in range(3)]
    graph = make_graph(nodes, pairs_of([(0, 1)]))
    values = extract(
        spec("node_concat", parts=[nested("sgc", hops=0), nested("degree")]), graph, "node", None
    )
    assert values.tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]


def test_node_concat_no_nodes() -> None:
    graph = make_graph([], [])
    values = extract(spec("node_concat", parts=[nested("degree"), nested("pagerank")]), graph, "node", None)
    assert values.shape == (0, 2)


def test_node_concat_shares_parts_with_other_models() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (1, 2), (2, 0)]))
    extract(spec("node_concat", parts=[nested("clustering"), nested("triangles")]), graph, "node", None)
    extract(spec("triangles"), graph, "node", None)
    triangle_results = [key for key in graph.cache if str(key).startswith("features/triangles@1/")]
    assert len(triangle_results) == 1


# Every node extractor on the awkward graph, with nodes given in any order.

NODE_SPECS = [
    spec("degree"),
    spec("clustering"),
    spec("triangles"),
    spec("pagerank"),
    spec("pagerank", directed=True, weight="weight"),
    spec("core_number"),
    spec("betweenness"),
    spec("anchor_pagerank", anchors=3),
    spec("neighbor_mean"),
    spec("node_concat", parts=[nested("degree", direction="out"), nested("triangles")]),
]


@pytest.mark.parametrize("feature_spec", NODE_SPECS, ids=lambda item: item.name)
def test_node_extractors_handle_awkward_graph(feature_spec: Any) -> None:
    values = extract(feature_spec, awkward_graph(), "node", None)
    assert values.shape[0] == 5
    assert np.all(np.isfinite(values))


@pytest.mark.parametrize("feature_spec", NODE_SPECS, ids=lambda item: item.name)
def test_node_extractors_handle_one_node(feature_spec: Any) -> None:
    values = extract(feature_spec, make_graph([{"id": "only"}], []), "node", None)
    assert values.shape[0] == 1
    assert np.all(np.isfinite(values))


def test_pagerank_highest_alpha_converges() -> None:
    graph = from_networkx(nx.barabasi_albert_graph(2_000, 3, seed=3))
    values = column(graph, "pagerank", alpha=0.95)
    assert sum(values) == pytest.approx(1.0)
