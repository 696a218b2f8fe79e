"""Builders of request graphs shared by the feature tests."""

from __future__ import annotations

from typing import Any

import networkx as nx

from graphinfer.models.graph import GraphInput, build_graph
from graphinfer.models.manifest import FeatureSpec
from graphinfer.models.schema import GraphPayload


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


def from_networkx(graph: nx.Graph, **edge_attributes: Any) -> GraphInput:
    """Build a request graph with the nodes and edges of a networkx graph, in its order."""
    return make_graph(
        [{"id": node} for node in graph.nodes],
        [{"source": u, "target": v, **edge_attributes} for u, v in graph.edges],
        directed=graph.is_directed(),
        multigraph=graph.is_multigraph(),
    )


def plain_nodes(count: int) -> list[dict[str, Any]]:
    return [{"id": node} for node in range(count)]


def pairs_of(edges: list[tuple[int, int]], **attributes: Any) -> list[dict[str, Any]]:
    return [{"source": u, "target": v, **attributes} for u, v in edges]


def spec(name: str, **params: Any) -> FeatureSpec:
    return FeatureSpec(name=name, params=params, version=1)


def nested(name: str, **params: Any) -> dict[str, Any]:
    """Return a feature spec as it appears nested in another extractor's parameters."""
    return {"name": name, "version": 1, "params": params}
