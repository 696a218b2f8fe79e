"""Tests of the feature extractors, their registry and the per-graph memoisation."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphinfer.errors import GraphinferError
from graphinfer.models.datasets import CoraData, cora_ego_request, cora_full_request, load_cora
from graphinfer.models.features import (
    Extractor,
    FeatureRegistry,
    Param,
    describe,
    extract,
    feature_cache_key,
)
from graphinfer.models.graph import GraphInput, build_graph
from graphinfer.models.manifest import FeatureSpec
from graphinfer.models.schema import GraphPayload, PredictRequest

WL = FeatureSpec(name="wl_histogram", params={}, version=1)
WL_SMALL = FeatureSpec(name="wl_histogram", params={"dim": 64}, version=1)
SGC = FeatureSpec(name="sgc", params={}, version=1)
SGC_ONE_HOP = FeatureSpec(name="sgc", params={"hops": 1}, version=1)
SGC_ONE_HOP_WEIGHTED = FeatureSpec(name="sgc", params={"hops": 1, "weight": "weight"}, version=1)
STATISTICS_COLUMNS = 4


def make_graph(
    nodes: list[dict[str, Any]],
    edges: list[dict[str, Any]],
    *,
    directed: bool = False,
    multigraph: bool = False,
) -> GraphInput:
    payload = GraphPayload.model_validate(
        {"directed": directed, "multigraph": multigraph, "nodes": nodes, "edges": edges}
    )
    return build_graph(payload)


def labelled(*labels: str) -> list[dict[str, Any]]:
    return [{"id": position, "label": label} for position, label in enumerate(labels)]


def one_hot(size: int) -> list[dict[str, Any]]:
    return [
        {"id": position, "features": [1.0 if column == position else 0.0 for column in range(size)]}
        for position in range(size)
    ]


def wl_statistics(row: np.ndarray) -> list[float]:
    return row[0, -STATISTICS_COLUMNS:].tolist()


# Weisfeiler-Lehman histogram on awkward graphs.


def test_wl_histogram_row_shape() -> None:
    graph = make_graph(labelled("C", "N", "O"), [{"source": 0, "target": 1}])
    row = extract(WL, graph, "graph", None)
    assert row.shape == (1, 1024 + STATISTICS_COLUMNS)
    assert row.dtype == np.float64
    assert row.flags.c_contiguous


def test_wl_histogram_counts_every_round() -> None:
    graph = make_graph(labelled("C", "N", "O"), [{"source": 0, "target": 1}])
    row = extract(WL, graph, "graph", None)
    assert row[0, :1024].sum() == 3 * (3 + 1)


def test_wl_histogram_zero_iterations() -> None:
    spec = FeatureSpec(name="wl_histogram", params={"iterations": 0}, version=1)
    graph = make_graph(labelled("C", "C", "O"), [{"source": 0, "target": 1}])
    row = extract(spec, graph, "graph", None)
    assert row[0, :1024].sum() == 3
    assert sorted(row[0, :1024][row[0, :1024] > 0].tolist()) == [1.0, 2.0]


def test_wl_histogram_statistics() -> None:
    graph = make_graph(
        labelled("C", "C", "C", "O"),
        [{"source": 0, "target": 1}, {"source": 1, "target": 2}, {"source": 1, "target": 3}],
    )
    row = extract(WL, graph, "graph", None)
    assert wl_statistics(row) == [4.0, 3.0, 1.5, 3.0]


def test_wl_histogram_without_statistics() -> None:
    spec = FeatureSpec(name="wl_histogram", params={"statistics": False, "dim": 16}, version=1)
    graph = make_graph(labelled("C"), [])
    assert extract(spec, graph, "graph", None).shape == (1, 16)


def test_wl_histogram_directed_equals_undirected() -> None:
    undirected = make_graph(labelled("C", "N", "O"), [{"source": 0, "target": 1}])
    directed = make_graph(
        labelled("C", "N", "O"),
        [{"source": 0, "target": 1}, {"source": 1, "target": 0}],
        directed=True,
    )
    assert np.array_equal(extract(WL, directed, "graph", None), extract(WL, undirected, "graph", None))


def test_wl_histogram_multigraph_collapses_parallel_edges() -> None:
    simple = make_graph(labelled("C", "N"), [{"source": 0, "target": 1}])
    multi = make_graph(
        labelled("C", "N"),
        [
            {"source": 0, "target": 1, "weight": 1.0},
            {"source": 1, "target": 0, "weight": 2.0},
        ],
        multigraph=True,
    )
    row = extract(WL, multi, "graph", None)
    assert wl_statistics(row) == [2.0, 1.0, 1.0, 1.0]
    assert np.array_equal(row, extract(WL, simple, "graph", None))


def test_wl_histogram_directed_multigraph() -> None:
    graph = make_graph(
        labelled("C", "N", "O"),
        [{"source": 0, "target": 1}, {"source": 0, "target": 1}, {"source": 2, "target": 1}],
        directed=True,
        multigraph=True,
    )
    assert wl_statistics(extract(WL, graph, "graph", None)) == [3.0, 2.0, 4 / 3, 2.0]


def test_wl_histogram_self_loop_dropped() -> None:
    plain = make_graph(labelled("C", "N"), [{"source": 0, "target": 1}])
    looped = make_graph(labelled("C", "N"), [{"source": 0, "target": 1}, {"source": 0, "target": 0}])
    assert np.array_equal(extract(WL, looped, "graph", None), extract(WL, plain, "graph", None))


def test_wl_histogram_one_node() -> None:
    row = extract(WL, make_graph(labelled("C"), []), "graph", None)
    assert row[0, :1024].sum() == 4
    assert wl_statistics(row) == [1.0, 0.0, 0.0, 0.0]


def test_wl_histogram_no_edges() -> None:
    row = extract(WL, make_graph(labelled("C", "C", "N"), []), "graph", None)
    assert row[0, :1024].sum() == 12
    assert wl_statistics(row) == [3.0, 0.0, 0.0, 0.0]


def test_wl_histogram_isolated_node() -> None:
    graph = make_graph(labelled("C", "N", "Br"), [{"source": 0, "target": 1}])
    row = extract(WL, graph, "graph", None)
    assert wl_statistics(row) == [3.0, 1.0, 2 / 3, 1.0]


def test_wl_histogram_no_nodes() -> None:
    row = extract(WL, make_graph([], []), "graph", None)
    assert row.shape == (1, 1024 + STATISTICS_COLUMNS)
    assert not row.any()


def test_wl_histogram_non_ascii_label() -> None:
    graph = make_graph(labelled("é", "日本"), [{"source": 0, "target": 1}])
    assert extract(WL, graph, "graph", None)[0, :1024].sum() == 8


def test_wl_histogram_int_and_text_labels_equal() -> None:
    as_int = make_graph([{"id": 0, "label": 1}, {"id": 1, "label": 2}], [{"source": 0, "target": 1}])
    as_text = make_graph([{"id": 0, "label": "1"}, {"id": 1, "label": "2"}], [{"source": 0, "target": 1}])
    assert np.array_equal(extract(WL, as_int, "graph", None), extract(WL, as_text, "graph", None))


def test_wl_histogram_labels_change_row() -> None:
    carbon = make_graph(labelled("C", "C"), [{"source": 0, "target": 1}])
    nitrogen = make_graph(labelled("C", "N"), [{"source": 0, "target": 1}])
    assert not np.array_equal(extract(WL, carbon, "graph", None), extract(WL, nitrogen, "graph", None))


def test_wl_histogram_missing_attribute() -> None:
    graph = make_graph([{"id": "a", "label": "C"}, {"id": "b"}], [{"source": "a", "target": "b"}])
    with pytest.raises(GraphinferError) as caught:
        extract(WL, graph, "graph", None)
    assert caught.value.code == "incompatible_input"
    assert "'label'" in caught.value.message
    assert "'b'" in caught.value.message


def test_wl_histogram_other_attribute() -> None:
    spec = FeatureSpec(name="wl_histogram", params={"node_attribute": "element"}, version=1)
    graph = make_graph([{"id": 0, "element": "C"}, {"id": 1, "element": "O"}], [{"source": 0, "target": 1}])
    assert extract(spec, graph, "graph", None)[0, :1024].sum() == 8


@st.composite
def labelled_graphs_and_relabelling(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Draw a labelled graph and the same graph with new ids and shuffled node and edge order."""
    size = draw(st.integers(min_value=1, max_value=12))
    labels = draw(st.lists(st.sampled_from("CNOS"), min_size=size, max_size=size))
    pairs = st.tuples(st.integers(0, size - 1), st.integers(0, size - 1))
    edges = sorted({(min(u, v), max(u, v)) for u, v in draw(st.lists(pairs, max_size=3 * size)) if u != v})
    new_ids = draw(
        st.lists(
            st.one_of(st.integers(-1000, 1000), st.text("abcdefxyz", min_size=1, max_size=4)),
            min_size=size,
            max_size=size,
            unique_by=str,
        )
    )
    shuffler = random.Random(draw(st.integers(0, 2**32 - 1)))

    original = {
        "nodes": [{"id": node, "label": labels[node]} for node in range(size)],
        "edges": [{"source": u, "target": v} for u, v in edges],
    }
    renamed_nodes = [{"id": new_ids[node], "label": labels[node]} for node in range(size)]
    renamed_edges = [
        {"source": new_ids[v], "target": new_ids[u]}
        if shuffler.random() < 0.5
        else {"source": new_ids[u], "target": new_ids[v]}
        for u, v in edges
    ]
    shuffler.shuffle(renamed_nodes)
    shuffler.shuffle(renamed_edges)
    return original, {"nodes": renamed_nodes, "edges": renamed_edges}


@settings(max_examples=50, deadline=None, derandomize=True)
@given(labelled_graphs_and_relabelling())
def test_wl_histogram_invariant_to_renaming(graphs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    original, renamed = graphs
    original_row = extract(WL_SMALL, make_graph(**original), "graph", None)
    renamed_row = extract(WL_SMALL, make_graph(**renamed), "graph", None)
    assert np.array_equal(original_row, renamed_row)


# Simplified graph convolution on awkward graphs.


def test_sgc_path_graph_values() -> None:
    graph = make_graph(one_hot(3), [{"source": 0, "target": 1}, {"source": 1, "target": 2}])
    rows = extract(SGC_ONE_HOP, graph, "node", None)
    expected = np.array([[1 / 2, 1 / 2, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 1 / 2, 1 / 2]])
    np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-15)


def test_sgc_two_hops_is_squared_propagation() -> None:
    graph = make_graph(one_hot(3), [{"source": 0, "target": 1}, {"source": 1, "target": 2}])
    propagation = np.array([[1 / 2, 1 / 2, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 1 / 2, 1 / 2]])
    rows = extract(SGC, graph, "node", None)
    np.testing.assert_allclose(rows, propagation @ propagation, rtol=0, atol=1e-15)


def test_sgc_concat_blocks() -> None:
    spec = FeatureSpec(name="sgc", params={"hops": 2, "concat": True}, version=1)
    graph = make_graph(one_hot(3), [{"source": 0, "target": 1}, {"source": 1, "target": 2}])
    rows = extract(spec, graph, "node", None)
    assert rows.shape == (3, 9)
    assert np.array_equal(rows[:, :3], np.eye(3))
    np.testing.assert_allclose(rows[:, 3:6], extract(SGC_ONE_HOP, graph, "node", None))
    np.testing.assert_allclose(rows[:, 6:], extract(SGC, graph, "node", None))


def test_sgc_normalize_features() -> None:
    spec = FeatureSpec(name="sgc", params={"hops": 0, "normalize_features": True}, version=1)
    graph = make_graph([{"id": 0, "features": [1.0, 3.0]}, {"id": 1, "features": [0.0, 0.0]}], [])
    rows = extract(spec, graph, "node", None)
    assert rows.tolist() == [[0.25, 0.75], [0.0, 0.0]]


def test_sgc_directed_ignores_direction() -> None:
    undirected = make_graph(one_hot(2), [{"source": 0, "target": 1}])
    directed = make_graph(one_hot(2), [{"source": 1, "target": 0}], directed=True)
    assert np.array_equal(
        extract(SGC_ONE_HOP, directed, "node", None), extract(SGC_ONE_HOP, undirected, "node", None)
    )


def test_sgc_directed_reciprocal_weights_summed() -> None:
    graph = make_graph(
        one_hot(2),
        [{"source": 0, "target": 1, "weight": 1.0}, {"source": 1, "target": 0, "weight": 2.0}],
        directed=True,
    )
    rows = extract(SGC_ONE_HOP_WEIGHTED, graph, "node", None)
    np.testing.assert_allclose(rows, [[0.25, 0.75], [0.75, 0.25]], rtol=0, atol=1e-15)


def test_sgc_multigraph_weights_summed() -> None:
    graph = make_graph(
        one_hot(2),
        [{"source": 0, "target": 1, "weight": 1.0}, {"source": 0, "target": 1, "weight": 2.0}],
        multigraph=True,
    )
    rows = extract(SGC_ONE_HOP_WEIGHTED, graph, "node", None)
    np.testing.assert_allclose(rows, [[0.25, 0.75], [0.75, 0.25]], rtol=0, atol=1e-15)


def test_sgc_multigraph_unweighted_collapses() -> None:
    graph = make_graph(
        one_hot(2),
        [{"source": 0, "target": 1, "weight": 1.0}, {"source": 0, "target": 1, "weight": 2.0}],
        multigraph=True,
    )
    rows = extract(SGC_ONE_HOP, graph, "node", None)
    assert rows.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_sgc_missing_weight_counts_one() -> None:
    graph = make_graph(one_hot(2), [{"source": 0, "target": 1}])
    rows = extract(SGC_ONE_HOP_WEIGHTED, graph, "node", None)
    assert rows.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_sgc_self_loop_dropped() -> None:
    graph = make_graph(one_hot(2), [{"source": 0, "target": 0, "weight": 5.0}, {"source": 0, "target": 1}])
    weighted = extract(SGC_ONE_HOP_WEIGHTED, graph, "node", None)
    unweighted = extract(SGC_ONE_HOP, graph, "node", None)
    assert weighted.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert unweighted.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_sgc_one_node() -> None:
    graph = make_graph([{"id": "only", "features": [2.0, 0.0, 1.0]}], [])
    assert extract(SGC, graph, "node", None).tolist() == [[2.0, 0.0, 1.0]]


def test_sgc_no_edges_keeps_features() -> None:
    graph = make_graph(one_hot(3), [])
    assert np.array_equal(extract(SGC, graph, "node", None), np.eye(3))


def test_sgc_isolated_node_keeps_features() -> None:
    graph = make_graph(one_hot(3), [{"source": 0, "target": 1}])
    rows = extract(SGC_ONE_HOP, graph, "node", None)
    assert rows[2].tolist() == [0.0, 0.0, 1.0]
    assert rows[0].tolist() == [0.5, 0.5, 0.0]


def test_sgc_sparse_features() -> None:
    dense = make_graph(
        [{"id": 0, "features": [0.0, 1.0, 0.0]}, {"id": 1, "features": [1.0, 0.0, 0.0]}],
        [{"source": 0, "target": 1}],
    )
    sparse = make_graph(
        [
            {"id": 0, "features": {"indices": [1], "values": [1.0], "dim": 3}},
            {"id": 1, "features": {"indices": [0], "values": [1.0], "dim": 3}},
        ],
        [{"source": 0, "target": 1}],
    )
    assert np.array_equal(extract(SGC, sparse, "node", None), extract(SGC, dense, "node", None))


def test_sgc_targets_in_requested_order() -> None:
    graph = make_graph(
        [{"id": name, "features": [float(position)]} for position, name in enumerate("abc")], []
    )
    rows = extract(SGC, graph, "node", ["c", "a", "c"])
    assert rows.tolist() == [[2.0], [0.0], [2.0]]


def test_sgc_unknown_target() -> None:
    graph = make_graph(one_hot(2), [])
    with pytest.raises(GraphinferError) as caught:
        extract(SGC, graph, "node", [0, "zz"])
    assert caught.value.code == "invalid_targets"
    assert "'zz'" in caught.value.message


def test_sgc_without_features() -> None:
    graph = make_graph(labelled("C", "N"), [{"source": 0, "target": 1}])
    with pytest.raises(GraphinferError) as caught:
        extract(SGC, graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "features" in caught.value.message


def test_sgc_negative_weight() -> None:
    graph = make_graph(one_hot(2), [{"source": 0, "target": 1, "weight": -1.0}])
    with pytest.raises(GraphinferError) as caught:
        extract(SGC_ONE_HOP_WEIGHTED, graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "-1.0" in caught.value.message


def test_sgc_text_weight() -> None:
    graph = make_graph(one_hot(2), [{"source": 0, "target": 1, "strength": "high"}])
    spec = FeatureSpec(name="sgc", params={"weight": "strength"}, version=1)
    with pytest.raises(GraphinferError) as caught:
        extract(spec, graph, "node", None)
    assert caught.value.code == "incompatible_input"


def test_sgc_no_nodes() -> None:
    graph = make_graph([], [])
    assert extract(SGC, graph, "node", None).shape == (0, 0)


# SGC on Cora: an ego subgraph of 2 hops gives its centre the whole graph's row.


@pytest.fixture(scope="module")
def cora() -> CoraData:
    return load_cora()


@pytest.fixture(scope="module")
def cora_whole(cora: CoraData) -> GraphInput:
    request = PredictRequest.model_validate(cora_full_request(cora, "cora-all"))
    return build_graph(request.graph)


@pytest.mark.parametrize(
    "spec",
    [SGC, FeatureSpec(name="sgc", params={"concat": True, "normalize_features": True}, version=1)],
    ids=["default", "concat-normalized"],
)
def test_sgc_cora_ego_equals_whole_graph(cora: CoraData, cora_whole: GraphInput, spec: FeatureSpec) -> None:
    test_nodes = [int(node) for node in cora.split_nodes("test")]
    largest_ego = 1453
    chosen = [*test_nodes[:15], *test_nodes[-5:], largest_ego]
    whole_rows = extract(spec, cora_whole, "node", chosen)
    for position, node in enumerate(chosen):
        request = PredictRequest.model_validate(cora_ego_request(cora, node, f"cora-{node}"))
        assert request.targets is not None
        ego_row = extract(spec, build_graph(request.graph), "node", request.targets.nodes)
        np.testing.assert_allclose(ego_row[0], whole_rows[position], rtol=1e-12, atol=1e-15)


def test_sgc_cora_one_hop_ego_differs(cora: CoraData, cora_whole: GraphInput) -> None:
    node = int(cora.split_nodes("test")[0])
    request = PredictRequest.model_validate(cora_ego_request(cora, node, "cora-1hop", hops=1))
    ego_row = extract(SGC, build_graph(request.graph), "node", [node])
    assert not np.allclose(ego_row, extract(SGC, cora_whole, "node", [node]))


# Registry, parameters and errors.


def test_extract_unknown_name() -> None:
    graph = make_graph(labelled("C"), [])
    with pytest.raises(GraphinferError) as caught:
        extract(FeatureSpec(name="no_such_extractor", version=1), graph, "graph", None)
    assert caught.value.code == "incompatible_input"
    assert "no_such_extractor@1" in caught.value.message
    assert "sgc@1" in caught.value.message
    assert "wl_histogram@1" in caught.value.message


def test_extract_unknown_version() -> None:
    graph = make_graph(labelled("C"), [])
    with pytest.raises(GraphinferError) as caught:
        extract(FeatureSpec(name="wl_histogram", version=7), graph, "graph", None)
    assert caught.value.code == "incompatible_input"
    assert "wl_histogram@7" in caught.value.message
    assert "version(s) 1" in caught.value.message


def test_extract_task_mismatch() -> None:
    graph = make_graph(labelled("C"), [])
    with pytest.raises(GraphinferError) as caught:
        extract(WL, graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "'node'" in caught.value.message


def test_extract_unknown_param() -> None:
    graph = make_graph(labelled("C"), [])
    spec = FeatureSpec(name="wl_histogram", params={"rounds": 2}, version=1)
    with pytest.raises(GraphinferError) as caught:
        extract(spec, graph, "graph", None)
    assert caught.value.code == "incompatible_input"
    assert "'rounds'" in caught.value.message


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"dim": 0}, "an integer >= 1 and <= 1048576"),
        ({"dim": True}, "an integer"),
        ({"iterations": "3"}, "an integer"),
        ({"statistics": 1}, "true or false"),
        ({"node_attribute": ""}, "a non-empty string"),
    ],
)
def test_extract_invalid_param(params: dict[str, Any], expected: str) -> None:
    graph = make_graph(labelled("C"), [])
    spec = FeatureSpec(name="wl_histogram", params=params, version=1)
    with pytest.raises(GraphinferError) as caught:
        extract(spec, graph, "graph", None)
    assert caught.value.code == "incompatible_input"
    assert expected in caught.value.message


def test_extract_result_is_a_copy() -> None:
    graph = make_graph(labelled("C", "N"), [{"source": 0, "target": 1}])
    first = extract(WL, graph, "graph", None)
    first[:] = -1.0
    assert extract(WL, graph, "graph", None).min() >= 0.0


def test_feature_cache_key_ignores_param_order() -> None:
    extractor = FeatureRegistry().register(CountingExtractor)()
    first = feature_cache_key(extractor, {"a": 1, "b": [1, 2]})
    second = feature_cache_key(extractor, {"b": [1, 2], "a": 1})
    assert first == second
    assert first == 'features/counting@1/{"a":1,"b":[1,2]}'


def test_describe_lists_extractors() -> None:
    described = {item["name"]: item for item in describe()}
    assert set(described) == {
        "adamic_adar",
        "anchor_pagerank",
        "betweenness",
        "clustering",
        "common_neighbors",
        "components",
        "core_number",
        "degree",
        "degree_statistics",
        "density",
        "edge_attribute_statistics",
        "edge_concat",
        "feature_similarity",
        "graph_clustering",
        "graph_concat",
        "graph_size",
        "jaccard",
        "neighbor_mean",
        "node_attributes",
        "node_concat",
        "pagerank",
        "preferential_attachment",
        "resource_allocation",
        "sgc",
        "triangles",
        "wl_histogram",
    }
    assert described["wl_histogram"]["task"] == "graph"
    assert described["sgc"]["task"] == "node"
    assert described["sgc"]["params"]["hops"]["default"] == 2
    assert described["wl_histogram"]["params"]["dim"]["default"] == 1024


@pytest.mark.parametrize("item", describe(), ids=lambda item: item["name"])
def test_describe_states_graph_treatment(item: dict[str, Any]) -> None:
    assert item["version"] == 1
    assert item["multigraph"]
    assert item["self_loops"]
    assert item["direction"]
    assert item["description"]
    assert item["cost"].startswith(("O(", "the sum")), item["cost"]


# Memoisation: one computation per graph for each (name, params, version).


class CountingExtractor(Extractor):
    """Test extractor that counts its computations."""

    name = "counting"
    version = 1
    task = "graph"
    params: ClassVar[Mapping[str, Param]] = {"scale": Param(1, "int", "Multiplier.", minimum=1)}
    multigraph = "not read"
    self_loops = "not read"
    direction = "not read"
    calls: ClassVar[list[int]] = []

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> np.ndarray:
        self.calls.append(params["scale"])
        return np.array([[graph_input.number_of_nodes * params["scale"]]], dtype=np.float64)


@pytest.fixture
def counting_registry() -> FeatureRegistry:
    CountingExtractor.calls.clear()
    registry = FeatureRegistry()
    registry.register(CountingExtractor)
    return registry


def test_extract_memoised_per_graph(counting_registry: FeatureRegistry) -> None:
    graph = make_graph(labelled("C", "N"), [])
    implicit = FeatureSpec(name="counting", params={}, version=1)
    explicit = FeatureSpec(name="counting", params={"scale": 1}, version=1)
    counting_registry.extract(implicit, graph, "graph")
    counting_registry.extract(explicit, graph, "graph")
    counting_registry.extract(implicit, graph, "graph")
    assert CountingExtractor.calls == [1]


def test_extract_memo_separates_params(counting_registry: FeatureRegistry) -> None:
    graph = make_graph(labelled("C", "N"), [])
    double = FeatureSpec(name="counting", params={"scale": 2}, version=1)
    counting_registry.extract(FeatureSpec(name="counting", version=1), graph, "graph")
    row = counting_registry.extract(double, graph, "graph")
    assert CountingExtractor.calls == [1, 2]
    assert row.tolist() == [[4.0]]


def test_extract_memo_separates_graphs(counting_registry: FeatureRegistry) -> None:
    spec = FeatureSpec(name="counting", version=1)
    counting_registry.extract(spec, make_graph(labelled("C"), []), "graph")
    counting_registry.extract(spec, make_graph(labelled("C"), []), "graph")
    assert CountingExtractor.calls == [1, 1]


def test_register_twice_rejected(counting_registry: FeatureRegistry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        counting_registry.register(CountingExtractor)


def test_extract_shares_sgc_result_across_targets() -> None:
    graph = make_graph(one_hot(3), [{"source": 0, "target": 1}])
    extract(SGC, graph, "node", [0])
    extract(FeatureSpec(name="sgc", params={"hops": 2, "concat": False}, version=1), graph, "node", [2])
    extract(SGC_ONE_HOP, graph, "node", None)
    assert len([key for key in graph.cache if str(key).startswith("features/")]) == 2


def test_sgc_overflowing_weights() -> None:
    graph = make_graph(
        one_hot(3),
        [{"source": 0, "target": 1, "weight": 1e308}, {"source": 0, "target": 2, "weight": 1e308}],
    )
    with pytest.raises(GraphinferError) as caught:
        extract(SGC_ONE_HOP_WEIGHTED, graph, "node", None)
    assert caught.value.code == "incompatible_input"


def test_extract_node_rows_are_a_copy() -> None:
    graph = make_graph(one_hot(2), [{"source": 0, "target": 1}])
    first = extract(SGC, graph, "node", None)
    first[:] = -1.0
    assert extract(SGC, graph, "node", None).min() >= 0.0


# Nested feature specs and the newer parameter kinds.


def test_nested_spec_defaults_share_cache_key() -> None:
    graph = make_graph(one_hot(3), [{"source": 0, "target": 1}])
    short = FeatureSpec(name="neighbor_mean", params={"base": {"name": "degree", "version": 1}}, version=1)
    written_out = FeatureSpec(
        name="neighbor_mean",
        params={
            "base": {"name": "degree", "version": 1, "params": {"direction": "any", "weight": None}},
            "direction": "any",
        },
        version=1,
    )
    extract(short, graph, "node", None)
    extract(written_out, graph, "node", None)
    keys = [key for key in graph.cache if str(key).startswith("features/neighbor_mean@1/")]
    assert len(keys) == 1


def test_nested_spec_unknown_extractor() -> None:
    graph = make_graph(one_hot(2), [])
    spec = FeatureSpec(name="node_concat", params={"parts": [{"name": "missing", "version": 1}]}, version=1)
    with pytest.raises(GraphinferError) as caught:
        extract(spec, graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "missing@1" in caught.value.message


def test_nested_spec_malformed() -> None:
    graph = make_graph(one_hot(2), [])
    spec = FeatureSpec(name="node_concat", params={"parts": [{"name": "degree"}]}, version=1)
    with pytest.raises(GraphinferError) as caught:
        extract(spec, graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "features.params.parts[0]" in caught.value.message


def test_nested_spec_invalid_inner_param() -> None:
    graph = make_graph(one_hot(2), [])
    part = {"name": "degree", "version": 1, "params": {"direction": "sideways"}}
    spec = FeatureSpec(name="node_concat", params={"parts": [part]}, version=1)
    with pytest.raises(GraphinferError) as caught:
        extract(spec, graph, "node", None)
    assert caught.value.code == "incompatible_input"
    assert "one of 'any', 'in', 'out'" in caught.value.message


def test_nested_spec_list_must_not_be_empty() -> None:
    graph = make_graph(one_hot(2), [])
    with pytest.raises(GraphinferError) as caught:
        extract(FeatureSpec(name="node_concat", params={"parts": []}, version=1), graph, "node", None)
    assert caught.value.code == "incompatible_input"


@pytest.mark.parametrize(
    ("value", "valid"),
    [(0.5, True), (0, True), (0.96, False), (True, False), ("0.5", False), (float("nan"), False)],
)
def test_float_param_bounds(value: Any, valid: bool) -> None:
    param = Param(0.85, "float", "Damping.", 0.0, 0.95)
    if valid:
        assert param.validate("pagerank@1", "alpha", value) == float(value)
    else:
        with pytest.raises(GraphinferError):
            param.validate("pagerank@1", "alpha", value)


def test_param_describe_lists_choices() -> None:
    described = {item["name"]: item for item in describe()}
    assert described["degree"]["params"]["direction"]["choices"] == ["any", "in", "out"]
    assert described["node_concat"]["params"]["parts"]["task"] == "node"
