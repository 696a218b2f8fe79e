"""Tests of the edge-level extractors: link scores against networkx, pair handling and memoisation."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, ClassVar

import networkx as nx
import numpy as np
import pytest

from graphinfer.errors import GraphinferError
from graphinfer.models.features import EdgeExtractor, FeatureRegistry, Param, extract
from graphinfer.models.graph import GraphInput
from graphinfer.models.manifest import FeatureSpec
from tests.graphs import from_networkx, make_graph, nested, pairs_of, plain_nodes, spec

NETWORKX_SCORES = {
    "jaccard": nx.jaccard_coefficient,
    "adamic_adar": nx.adamic_adar_index,
    "resource_allocation": nx.resource_allocation_index,
    "preferential_attachment": nx.preferential_attachment,
}


def some_pairs(graph: nx.Graph, count: int = 120) -> list[tuple[int, int]]:
    pairs = list(itertools.combinations(sorted(graph.nodes), 2))
    return pairs[:: max(1, len(pairs) // count)]


@pytest.mark.parametrize("name", sorted(NETWORKX_SCORES))
def test_link_score_matches_networkx(name: str) -> None:
    reference = nx.gnm_random_graph(40, 120, seed=7)
    pairs = some_pairs(reference)
    expected = [score for _, _, score in NETWORKX_SCORES[name](reference, pairs)]
    values = extract(spec(name), from_networkx(reference), "edge", pairs)[:, 0]
    np.testing.assert_allclose(values, expected, rtol=1e-12)


def test_common_neighbors_matches_networkx() -> None:
    reference = nx.gnm_random_graph(40, 120, seed=8)
    pairs = some_pairs(reference)
    expected = [len(list(nx.common_neighbors(reference, u, v))) for u, v in pairs]
    values = extract(spec("common_neighbors"), from_networkx(reference), "edge", pairs)[:, 0]
    assert values.tolist() == [float(count) for count in expected]


def directed_multigraph() -> GraphInput:
    edges = [(0, 1), (1, 0), (0, 1), (1, 2), (2, 0), (2, 3), (3, 3)]
    return make_graph(plain_nodes(5), pairs_of(edges), directed=True, multigraph=True)


def simple_equivalent() -> GraphInput:
    return make_graph(plain_nodes(5), pairs_of([(0, 1), (1, 2), (2, 0), (2, 3)]))


@pytest.mark.parametrize("name", ["common_neighbors", *sorted(NETWORKX_SCORES)])
def test_link_score_multigraph_equals_simple_view(name: str) -> None:
    pairs = [(0, 3), (1, 3), (3, 0), (0, 4), (2, 2)]
    multi = extract(spec(name), directed_multigraph(), "edge", pairs)
    simple = extract(spec(name), simple_equivalent(), "edge", pairs)
    assert multi.tolist() == simple.tolist()


def test_link_scores_pair_with_itself() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (0, 2)]))
    parts = [
        nested("common_neighbors"),
        nested("jaccard"),
        nested("adamic_adar"),
        nested("resource_allocation"),
    ]
    values = extract(spec("edge_concat", parts=parts), graph, "edge", [(0, 0)])
    # Node 0's neighbours have degree 1, which Adamic-Adar skips (log 1 is 0).
    assert values.tolist() == [[2.0, 1.0, 0.0, 2.0]]


def test_edge_rows_follow_pair_order() -> None:
    graph = make_graph(plain_nodes(4), pairs_of([(0, 1), (1, 2), (2, 3), (1, 3)]))
    pairs = [(3, 0), (0, 2), (3, 0), (1, 1)]
    values = extract(spec("preferential_attachment"), graph, "edge", pairs)
    assert values[:, 0].tolist() == [2.0, 2.0, 2.0, 9.0]


def test_edge_default_targets_are_graph_edges() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (1, 2)]))
    assert extract(spec("preferential_attachment"), graph, "edge", None)[:, 0].tolist() == [2.0, 2.0]


def test_edge_no_pairs() -> None:
    graph = make_graph(plain_nodes(2), [])
    values = extract(
        spec("edge_concat", parts=[nested("jaccard"), nested("common_neighbors")]), graph, "edge", []
    )
    assert values.shape == (0, 2)


def test_edge_unknown_end_rejected() -> None:
    graph = make_graph(plain_nodes(2), [])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("jaccard"), graph, "edge", [(0, 1), (1, "ghost")])
    assert caught.value.code == "invalid_targets"
    assert "targets.edges[1].target" in caught.value.message


def test_edge_pair_not_a_pair_rejected() -> None:
    graph = make_graph(plain_nodes(2), [])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("jaccard"), graph, "edge", [(0, 1, 2)])
    assert caught.value.code == "invalid_targets"


def test_edge_extractor_rejects_node_task() -> None:
    graph = make_graph(plain_nodes(2), [])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("jaccard"), graph, "node", None)
    assert caught.value.code == "incompatible_input"


def test_link_scores_star_hub_pairs() -> None:
    # Every pair touches the hub; networkx's Jaccard costs O(n) per pair here.
    size = 20_000
    graph = from_networkx(nx.star_graph(size - 1))
    pairs = [(0, leaf) for leaf in range(1, size)]
    values = extract(spec("jaccard"), graph, "edge", pairs)
    assert values.shape == (size - 1, 1)
    assert values.max() == 0.0


# Feature similarity.


def features_graph() -> GraphInput:
    nodes = [
        {"id": "a", "features": [1.0, 0.0]},
        {"id": "b", "features": [1.0, 1.0]},
        {"id": "c", "features": [0.0, 0.0]},
    ]
    return make_graph(nodes, [{"source": "a", "target": "b"}])


def test_feature_similarity_cosine_raw_features() -> None:
    similarity = spec("feature_similarity", base=nested("sgc", hops=0))
    values = extract(similarity, features_graph(), "edge", [("a", "b"), ("a", "a"), ("a", "c")])
    np.testing.assert_allclose(values[:, 0], [1 / np.sqrt(2), 1.0, 0.0], rtol=1e-12)


def test_feature_similarity_dot() -> None:
    similarity = spec("feature_similarity", base=nested("sgc", hops=0), measure="dot")
    assert extract(similarity, features_graph(), "edge", [("a", "b")]).tolist() == [[1.0]]


def test_feature_similarity_needs_features() -> None:
    graph = make_graph(plain_nodes(2), [])
    with pytest.raises(GraphinferError) as caught:
        extract(spec("feature_similarity"), graph, "edge", [(0, 1)])
    assert caught.value.code == "incompatible_input"


def test_feature_similarity_of_structure() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (1, 2)]))
    similarity = spec("feature_similarity", base=nested("degree"), measure="dot")
    assert extract(similarity, graph, "edge", [(0, 1)]).tolist() == [[2.0]]


# Memoisation: each pair is scored once per graph, for every model that requests it.


class CountingPairs(EdgeExtractor):
    """Test edge extractor that records the pairs it scores."""

    name = "counting_pairs"
    version = 1
    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = "not read"
    self_loops = "not read"
    direction = "not read"
    scored: ClassVar[list[tuple[int, int]]] = []

    def score_pairs(
        self, graph_input: GraphInput, params: Mapping[str, Any], pairs: np.ndarray
    ) -> np.ndarray:
        self.scored.extend((int(u), int(v)) for u, v in pairs.tolist())
        return pairs.sum(axis=1, keepdims=True).astype(np.float64)


@pytest.fixture
def counting_registry() -> FeatureRegistry:
    CountingPairs.scored.clear()
    registry = FeatureRegistry()
    registry.register(CountingPairs)
    return registry


def test_edge_pairs_scored_once(counting_registry: FeatureRegistry) -> None:
    graph = make_graph(plain_nodes(4), [])
    counting = FeatureSpec(name="counting_pairs", version=1)
    first = counting_registry.extract(counting, graph, "edge", [(0, 1), (2, 3), (0, 1)])
    second = counting_registry.extract(counting, graph, "edge", [(2, 3), (1, 2)])
    assert CountingPairs.scored == [(0, 1), (2, 3), (1, 2)]
    assert first[:, 0].tolist() == [1.0, 5.0, 1.0]
    assert second[:, 0].tolist() == [5.0, 3.0]


def test_edge_rows_are_a_copy() -> None:
    graph = make_graph(plain_nodes(3), pairs_of([(0, 1), (1, 2)]))
    first = extract(spec("preferential_attachment"), graph, "edge", [(0, 2)])
    first[:] = -1.0
    assert extract(spec("preferential_attachment"), graph, "edge", [(0, 2)]).tolist() == [[1.0]]
