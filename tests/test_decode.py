"""The request parsing rules of the v1 contract, through decode_request."""

from __future__ import annotations

import json
from typing import Any

import networkx as nx
import pytest

from graphinfer.errors import RequestRejected
from graphinfer.models.decode import Limits, decode_request, request_hash

LIMITS = Limits(max_message_bytes=1_000_000, max_nodes=50, max_edges=50, max_targets=10)


def make_request(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "request_id": "r-1",
        "graph": {"nodes": [{"id": "a"}, {"id": "b"}], "edges": [{"source": "a", "target": "b"}]},
        "task": "graph",
    }
    request.update(overrides)
    return request


def decode(document: Any, **options: Any):
    raw = document if isinstance(document, bytes) else json.dumps(document).encode()
    return decode_request(raw, options.pop("limits", LIMITS), **options)


def rejection(document: Any, **options: Any) -> RequestRejected:
    with pytest.raises(RequestRejected) as caught:
        decode(document, **options)
    return caught.value


def test_string_and_integer_ids_accepted() -> None:
    graph = {"nodes": [{"id": "u1"}, {"id": 2}], "edges": [{"source": "u1", "target": 2}]}
    decoded = decode(make_request(graph=graph))
    assert decoded.graph.node_ids == ("u1", 2)
    assert decoded.graph.graph.has_edge("u1", 2)


@pytest.mark.parametrize("bad_id", [True, False, 1.0, 2.5, None])
def test_boolean_and_float_ids_rejected(bad_id: Any) -> None:
    error = rejection(make_request(graph={"nodes": [{"id": bad_id}]}))
    assert error.code == "invalid_graph"
    assert "graph.nodes[0].id" in error.message
    assert "strings or integers" in error.message


def test_float_edge_end_rejected() -> None:
    graph = {"nodes": [{"id": 1}], "edges": [{"source": 1.0, "target": 1}]}
    error = rejection(make_request(graph=graph))
    assert error.code == "invalid_graph"
    assert "graph.edges[0].source" in error.message


def test_integer_and_string_same_digits_rejected() -> None:
    error = rejection(make_request(graph={"nodes": [{"id": 1}, {"id": "1"}]}))
    assert error.code == "invalid_graph"
    assert "graph.nodes[1].id" in error.message
    assert "collides" in error.message


def test_duplicate_node_id_rejected() -> None:
    error = rejection(make_request(graph={"nodes": [{"id": "x"}, {"id": "x"}]}))
    assert error.code == "invalid_graph"
    assert "appears twice" in error.message


def test_links_accepted_in_place_of_edges() -> None:
    graph = {"nodes": [{"id": 1}, {"id": 2}], "links": [{"source": 1, "target": 2}]}
    decoded = decode(make_request(graph=graph))
    assert decoded.graph.graph.number_of_edges() == 1


def test_edges_and_links_together_rejected() -> None:
    graph = {"nodes": [{"id": 1}, {"id": 2}], "links": [], "edges": []}
    error = rejection(make_request(graph=graph))
    assert error.code == "invalid_graph"
    assert "both 'edges' and 'links'" in error.message


def test_edge_to_missing_node_names_it() -> None:
    graph = {"nodes": [{"id": "a"}], "edges": [{"source": "a", "target": "missing-node"}]}
    error = rejection(make_request(graph=graph))
    assert error.code == "invalid_graph"
    assert "'missing-node'" in error.message
    assert "graph.edges[0].target" in error.message
    assert error.details[0].field == "graph.edges[0].target"


def test_multigraph_absent_means_simple_graph() -> None:
    graph = {
        "nodes": [{"id": 1}, {"id": 2}],
        "edges": [{"source": 1, "target": 2}, {"source": 1, "target": 2}],
    }
    decoded = decode(make_request(graph=graph))
    assert type(decoded.graph.graph) is nx.Graph
    assert decoded.graph.multigraph is False
    assert decoded.graph.graph.number_of_edges() == 1


def test_directed_absent_means_undirected() -> None:
    decoded = decode(make_request())
    assert decoded.graph.directed is False
    assert not decoded.graph.graph.is_directed()


def test_multigraph_true_keeps_parallel_edges() -> None:
    graph = {
        "directed": True,
        "multigraph": True,
        "nodes": [{"id": 1}, {"id": 2}],
        "edges": [{"source": 1, "target": 2}, {"source": 1, "target": 2}],
    }
    decoded = decode(make_request(graph=graph))
    assert type(decoded.graph.graph) is nx.MultiDiGraph
    assert decoded.graph.graph.number_of_edges() == 2


def test_empty_graph_accepted() -> None:
    decoded = decode(make_request(graph={"nodes": [], "edges": []}))
    assert decoded.graph.number_of_nodes == 0
    assert decoded.graph.features is None


def test_sparse_and_dense_features_share_dimension() -> None:
    graph = {
        "nodes": [
            {"id": "a", "features": [0.0, 2.0, 0.0]},
            {"id": "b", "features": {"indices": [0], "values": [1.5], "dim": 3}},
        ]
    }
    decoded = decode(make_request(graph=graph))
    assert decoded.graph.features is not None
    assert decoded.graph.features.toarray().tolist() == [[0.0, 2.0, 0.0], [1.5, 0.0, 0.0]]


def test_ragged_features_rejected() -> None:
    graph = {"nodes": [{"id": "a", "features": [1.0, 2.0]}, {"id": "b", "features": [1.0]}]}
    error = rejection(make_request(graph=graph))
    assert error.code == "invalid_graph"
    assert "dimension 1" in error.message


def test_sparse_index_outside_dim_rejected() -> None:
    graph = {"nodes": [{"id": "a", "features": {"indices": [5], "values": [1.0], "dim": 3}}]}
    error = rejection(make_request(graph=graph))
    assert error.code == "invalid_graph"
    assert "index 5" in error.message


def test_nan_literal_rejected() -> None:
    error = rejection(b'{"request_id": "r", "graph": {"nodes": [{"id": 1, "features": [NaN]}]}}')
    assert error.code == "invalid_json"
    assert "NaN" in error.message


def test_infinity_literal_rejected() -> None:
    error = rejection(b'{"request_id": "r", "graph": {"nodes": [{"id": 1, "w": -Infinity}]}}')
    assert error.code == "invalid_json"


def test_duplicate_key_rejected() -> None:
    error = rejection(b'{"request_id": "a", "request_id": "b", "graph": {"nodes": []}}')
    assert error.code == "invalid_json"
    assert "'request_id'" in error.message


def test_invalid_utf8_rejected() -> None:
    assert rejection(b"\xff\xfe{}").code == "invalid_encoding"


def test_not_json_rejected() -> None:
    error = rejection(b"{not json")
    assert error.code == "invalid_json"
    assert "line 1" in error.message


def test_json_array_rejected() -> None:
    assert rejection(b"[1, 2]").code == "invalid_request"


def test_tombstone_rejected() -> None:
    with pytest.raises(RequestRejected) as caught:
        decode_request(None, LIMITS)
    assert caught.value.code == "invalid_request"
    assert "tombstone" in caught.value.message


def test_unknown_top_level_field_rejected() -> None:
    error = rejection(make_request(priority="high"))
    assert error.code == "invalid_request"
    assert "'priority'" in error.message


def test_unknown_task_rejected() -> None:
    error = rejection(make_request(task="subgraph"))
    assert error.code == "unknown_task"
    assert "'subgraph'" in error.message


@pytest.mark.parametrize("request_id", ["", "has space", "x" * 129, "é"])
def test_malformed_request_id_rejected(request_id: str) -> None:
    assert rejection(make_request(request_id=request_id)).code == "invalid_request"


def test_missing_request_id_rejected_on_kafka() -> None:
    document = make_request()
    del document["request_id"]
    error = rejection(document)
    assert error.code == "invalid_request"
    assert "request_id is missing" in error.message


def test_key_differing_from_request_id_rejected() -> None:
    error = rejection(make_request(), key=b"other-id")
    assert error.code == "invalid_request"
    assert "'other-id'" in error.message
    assert getattr(error, "request_id", None) == "r-1"


def test_key_equal_to_request_id_accepted() -> None:
    assert decode(make_request(), key=b"r-1").request.request_id == "r-1"


def test_other_schema_major_version_rejected() -> None:
    error = rejection(make_request(), headers={"graphinfer-schema": b"2"})
    assert error.code == "unsupported_schema"


def test_schema_minor_version_accepted() -> None:
    assert decode(make_request(), headers={"graphinfer-schema": b"1.3"}).request.request_id == "r-1"


def test_message_over_byte_cap_names_setting() -> None:
    raw = json.dumps(make_request(metadata={"pad": "x" * 2_000})).encode()
    error = rejection(raw, limits=Limits(max_message_bytes=1_024))
    assert error.code == "message_too_large"
    assert "GRAPHINFER_MAX_MESSAGE_BYTES" in error.message


def test_graph_over_node_cap_names_setting() -> None:
    graph = {"nodes": [{"id": index} for index in range(51)]}
    error = rejection(make_request(graph=graph))
    assert error.code == "graph_too_large"
    assert "GRAPHINFER_MAX_NODES" in error.message
    assert "51" in error.message


def test_graph_over_edge_cap_names_setting() -> None:
    graph = {"nodes": [{"id": 1}], "edges": [{"source": 1, "target": 1}] * 51}
    error = rejection(make_request(graph=graph))
    assert error.code == "graph_too_large"
    assert "GRAPHINFER_MAX_EDGES" in error.message


def test_target_not_in_graph_rejected() -> None:
    error = rejection(make_request(task="node", targets={"nodes": ["a", "zzz"]}))
    assert error.code == "invalid_targets"
    assert "targets.nodes[1]" in error.message


def test_edge_target_not_in_graph_rejected() -> None:
    error = rejection(make_request(task="edge", targets={"edges": [{"source": "a", "target": "q"}]}))
    assert error.code == "invalid_targets"


def test_rejection_recovers_request_id() -> None:
    error = rejection(make_request(graph={"nodes": [{"id": True}]}))
    assert getattr(error, "request_id", None) == "r-1"


def test_deadline_needs_time_zone() -> None:
    assert rejection(make_request(deadline="2026-12-04T10:00:00")).code == "invalid_request"
    assert decode(make_request(deadline="2026-12-04T10:00:00Z")).request.deadline is not None


def test_request_hash_ignores_id_and_metadata() -> None:
    first = decode(make_request(request_id="one", metadata={"a": "1"}))
    second = decode(make_request(request_id="two"))
    third = decode(make_request(task="node"))
    assert request_hash(first) == request_hash(second)
    assert request_hash(first) != request_hash(third)


def test_request_hash_defaults_normalised() -> None:
    explicit = make_request(graph={"directed": False, "multigraph": False, "nodes": [{"id": 1}], "edges": []})
    implicit = make_request(graph={"nodes": [{"id": 1}]})
    assert request_hash(decode(explicit)) == request_hash(decode(implicit))
