"""Tests of the vendored data sets and the v1 requests built from them."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from importlib import resources

import numpy as np
import pytest

from graphinfer.models.datasets import (
    CORA_FILE,
    DATA_PACKAGE,
    MUTAG_ATOM_SYMBOLS,
    MUTAG_CLASS_NAMES,
    MUTAG_FILE,
    CoraData,
    cora_ego_nodes,
    cora_ego_request,
    load_cora,
    load_mutag,
    mutag_class_name,
    mutag_holdout_split,
    mutag_request,
)
from graphinfer.models.graph import build_graph
from graphinfer.models.schema import PredictRequest

MAX_MESSAGE_BYTES = 1_000_000


@pytest.fixture(scope="module")
def mutag() -> list[dict]:
    return load_mutag()


@pytest.fixture(scope="module")
def cora() -> CoraData:
    return load_cora()


@pytest.mark.parametrize(
    ("file_name", "expected_sha256"),
    [
        (MUTAG_FILE, "0b3e3569056a66068f9164a756949d3da9de623c2e80adf80b30b75f78fc62c1"),
        (CORA_FILE, "e4b22a02888e552ef34aee316d7615c288fd6b4fa8144dc786d4fae60a70ab24"),
    ],
)
def test_vendored_file_checksum(file_name: str, expected_sha256: str) -> None:
    data = resources.files(DATA_PACKAGE).joinpath(file_name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == expected_sha256


def test_load_mutag_counts(mutag: list[dict]) -> None:
    labels = Counter(record["label"] for record in mutag)
    assert len(mutag) == 188
    assert labels[1] == 125
    assert labels[-1] == 63


def test_mutag_class_name_mapping(mutag: list[dict]) -> None:
    names = Counter(mutag_class_name(record) for record in mutag)
    assert MUTAG_CLASS_NAMES == {1: "mutagenic", -1: "non_mutagenic"}
    assert names == {"mutagenic": 125, "non_mutagenic": 63}


def test_mutag_class_name_unknown_label() -> None:
    with pytest.raises(ValueError, match="label 7"):
        mutag_class_name({"id": 1, "label": 7})


def test_mutag_holdout_split_sizes(mutag: list[dict]) -> None:
    train, test = mutag_holdout_split(mutag)
    test_names = Counter(mutag_class_name(record) for record in test)
    assert len(train) == 150
    assert len(test) == 38
    assert test_names == {"mutagenic": 25, "non_mutagenic": 13}


def test_mutag_holdout_split_partitions(mutag: list[dict]) -> None:
    train, test = mutag_holdout_split(mutag)
    train_ids = {record["id"] for record in train}
    test_ids = {record["id"] for record in test}
    assert train_ids.isdisjoint(test_ids)
    assert train_ids | test_ids == {record["id"] for record in mutag}


def test_mutag_holdout_split_deterministic(mutag: list[dict]) -> None:
    first = [record["id"] for record in mutag_holdout_split(mutag, seed=0)[1]]
    again = [record["id"] for record in mutag_holdout_split(list(mutag), seed=0)[1]]
    other_seed = [record["id"] for record in mutag_holdout_split(mutag, seed=1)[1]]
    assert first == again
    assert first != other_seed


def test_mutag_holdout_split_keeps_order(mutag: list[dict]) -> None:
    train, test = mutag_holdout_split(mutag)
    assert [record["id"] for record in train] == sorted(record["id"] for record in train)
    assert [record["id"] for record in test] == sorted(record["id"] for record in test)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_mutag_holdout_split_invalid_fraction(mutag: list[dict], fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        mutag_holdout_split(mutag, test_fraction=fraction)


def test_mutag_request_wire_form(mutag: list[dict]) -> None:
    record = mutag[0]
    request = mutag_request(record, "mutag-1")
    assert request["request_id"] == "mutag-1"
    assert request["task"] == "graph"
    assert request["graph"]["directed"] is False
    assert request["graph"]["multigraph"] is False
    assert "label" not in request["graph"]
    assert set(request) == {"request_id", "graph", "task"}


def test_mutag_request_atom_symbols(mutag: list[dict]) -> None:
    record = mutag[0]
    nodes = mutag_request(record, "mutag-1")["graph"]["nodes"]
    assert [node["id"] for node in nodes] == [node["id"] for node in record["nodes"]]
    assert [node["label"] for node in nodes] == [
        MUTAG_ATOM_SYMBOLS[node["label"]] for node in record["nodes"]
    ]


def test_mutag_request_keeps_edge_labels(mutag: list[dict]) -> None:
    record = mutag[0]
    edges = mutag_request(record, "mutag-1")["graph"]["edges"]
    assert edges == [
        {"source": edge["source"], "target": edge["target"], "label": edge["label"]}
        for edge in record["edges"]
    ]


def test_mutag_request_validates_every_graph(mutag: list[dict]) -> None:
    for record in mutag:
        request = PredictRequest.model_validate(mutag_request(record, f"mutag-{record['id']}"))
        graph_input = build_graph(request.graph)
        assert graph_input.number_of_nodes == len(record["nodes"])
        assert graph_input.graph.number_of_edges() == len(record["edges"])


def test_load_cora_shapes(cora: CoraData) -> None:
    assert cora.number_of_nodes == 2708
    assert cora.feature_dim == 1433
    assert len(cora.class_names) == 7
    assert len(cora.feature_indices) == 2708
    assert cora.labels.shape == (2708,)
    assert np.array_equal(cora.node_ids, np.arange(2708))


def test_load_cora_class_sizes(cora: CoraData) -> None:
    sizes = np.bincount(cora.labels, minlength=len(cora.class_names))
    assert cora.class_names[0] == "Case_Based"
    assert sizes.tolist() == [298, 418, 818, 426, 217, 180, 351]


def test_load_cora_split_sizes(cora: CoraData) -> None:
    assert len(cora.split_nodes("train")) == 140
    assert len(cora.split_nodes("val")) == 500
    assert len(cora.split_nodes("test")) == 1000
    assert sum(part is None for part in cora.split) == 1068


def test_load_cora_unknown_split(cora: CoraData) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        cora.split_nodes("dev")


def test_load_cora_adjacency_undirected(cora: CoraData) -> None:
    adjacency = cora.adjacency
    assert adjacency.shape == (2708, 2708)
    assert adjacency.nnz == 2 * 5278
    assert (adjacency != adjacency.T).nnz == 0
    assert adjacency.diagonal().sum() == 0
    assert set(np.unique(adjacency.data).tolist()) == {1.0}


def test_cora_ego_nodes_zero_hops(cora: CoraData) -> None:
    assert cora_ego_nodes(cora, 5, hops=0) == [5]


def test_cora_ego_nodes_one_hop(cora: CoraData) -> None:
    node = int(cora.split_nodes("test")[0])
    expected = sorted({node, *(int(neighbor) for neighbor in cora.neighbors(node))})
    assert cora_ego_nodes(cora, node, hops=1) == expected


def test_cora_ego_nodes_invalid_arguments(cora: CoraData) -> None:
    with pytest.raises(ValueError, match="hops"):
        cora_ego_nodes(cora, 0, hops=-1)
    with pytest.raises(ValueError, match="not a Cora node"):
        cora_ego_nodes(cora, 2708)


def test_cora_ego_request_wire_form(cora: CoraData) -> None:
    node = int(cora.split_nodes("test")[0])
    request = cora_ego_request(cora, node, f"cora-{node}")
    assert request["task"] == "node"
    assert request["targets"] == {"nodes": [node]}
    assert request["graph"]["directed"] is False
    assert [item["id"] for item in request["graph"]["nodes"]] == cora_ego_nodes(cora, node)


def test_cora_ego_request_sparse_features(cora: CoraData) -> None:
    node = int(cora.split_nodes("test")[0])
    request = cora_ego_request(cora, node, f"cora-{node}")
    for item in request["graph"]["nodes"]:
        features = item["features"]
        assert set(item) == {"id", "features"}
        assert features["dim"] == 1433
        assert features["indices"] == list(cora.feature_indices[item["id"]])
        assert features["values"] == [1.0] * len(features["indices"])


def test_cora_ego_request_induced_edges(cora: CoraData) -> None:
    node = int(cora.split_nodes("test")[3])
    request = cora_ego_request(cora, node, f"cora-{node}")
    members = cora_ego_nodes(cora, node)
    sub = cora.adjacency[members][:, members]
    edges = {(edge["source"], edge["target"]) for edge in request["graph"]["edges"]}
    assert len(edges) == len(request["graph"]["edges"])
    assert len(edges) == sub.nnz // 2
    assert all(source < target for source, target in edges)
    assert all(cora.adjacency[source, target] == 1.0 for source, target in edges)


def test_cora_ego_request_validates(cora: CoraData) -> None:
    node = int(cora.split_nodes("test")[0])
    request = PredictRequest.model_validate(cora_ego_request(cora, node, f"cora-{node}"))
    graph_input = build_graph(request.graph)
    assert graph_input.feature_dim == 1433
    assert graph_input.number_of_nodes == len(cora_ego_nodes(cora, node))


def test_cora_ego_request_largest_under_cap(cora: CoraData) -> None:
    sizes = [
        len(json.dumps(cora_ego_request(cora, int(node), f"cora-{int(node)}")))
        for node in cora.split_nodes("test")
    ]
    assert len(sizes) == 1000
    assert max(sizes) < MAX_MESSAGE_BYTES
