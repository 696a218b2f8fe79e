"""Build a networkx graph from validated node-link data, by graphinfer's rules.

networkx's own ``node_link_graph`` is not used: it builds a multigraph when
``multigraph`` is absent, silently adds a node for an edge to a missing one,
and merges the ids ``1``, ``True`` and ``1.0``. Here ``directed`` and
``multigraph`` default to false, every edge must name an existing node, and a
graph may not hold both ``1`` and ``"1"``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp

from graphinfer.errors import ErrorDetail, RequestRejected
from graphinfer.models.schema import GraphPayload, SparseFeatures, Targets

NodeKey = Hashable


@dataclass(frozen=True)
class GraphInput:
    """One request's graph, ready for feature extraction.

    ``graph`` carries every node and edge attribute except node features,
    which sit in ``features``: a CSR matrix with one row per node, in the
    order of ``node_ids`` (the request's order). ``features`` is ``None``
    when the request gave no node features.
    """

    graph: nx.Graph
    node_ids: tuple[NodeKey, ...]
    index: dict[NodeKey, int]
    features: sp.csr_matrix | None
    directed: bool
    multigraph: bool
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def feature_dim(self) -> int | None:
        return None if self.features is None else int(self.features.shape[1])

    @property
    def number_of_nodes(self) -> int:
        return len(self.node_ids)


def build_graph(payload: GraphPayload) -> GraphInput:
    """Check the graph-wide rules and build the networkx graph.

    Raises :class:`RequestRejected` with code ``invalid_graph`` naming the
    offending node or edge.
    """
    node_ids = _check_node_ids(payload)
    index = {node_id: position for position, node_id in enumerate(node_ids)}
    features = _feature_matrix(payload, node_ids)

    graph: nx.Graph
    if payload.directed:
        graph = nx.MultiDiGraph() if payload.multigraph else nx.DiGraph()
    else:
        graph = nx.MultiGraph() if payload.multigraph else nx.Graph()
    graph.graph.update(payload.graph)
    for node in payload.nodes:
        graph.add_node(node.id, **node.attributes())

    edge_field = "edges" if payload.edges is not None else "links"
    for position, edge in enumerate(payload.edge_list):
        for end in ("source", "target"):
            end_id = getattr(edge, end)
            if end_id not in index:
                raise RequestRejected(
                    f"graph.{edge_field}[{position}].{end} is {end_id!r}, which is not a node of "
                    "this graph; add the node to graph.nodes or remove the edge",
                    code="invalid_graph",
                    details=[
                        ErrorDetail(f"graph.{edge_field}[{position}].{end}", end_id, "an id in graph.nodes")
                    ],
                )
        if isinstance(graph, nx.MultiGraph):
            graph.add_edge(edge.source, edge.target, key=edge.key, **edge.attributes())
        else:
            graph.add_edge(edge.source, edge.target, **edge.attributes())

    return GraphInput(
        graph=graph,
        node_ids=tuple(node_ids),
        index=index,
        features=features,
        directed=payload.directed,
        multigraph=payload.multigraph,
    )


def check_targets(graph_input: GraphInput, targets: Targets | None) -> None:
    """Reject targets that name nodes the graph does not contain."""
    if targets is None:
        return
    for position, node_id in enumerate(targets.nodes or ()):
        if node_id not in graph_input.index:
            raise RequestRejected(
                f"targets.nodes[{position}] is {node_id!r}, which is not a node of this graph; "
                "name nodes listed in graph.nodes",
                code="invalid_targets",
                details=[ErrorDetail(f"targets.nodes[{position}]", node_id, "an id in graph.nodes")],
            )
    for position, edge in enumerate(targets.edges or ()):
        for end in ("source", "target"):
            end_id = getattr(edge, end)
            if end_id not in graph_input.index:
                raise RequestRejected(
                    f"targets.edges[{position}].{end} is {end_id!r}, which is not a node of this "
                    "graph; name nodes listed in graph.nodes",
                    code="invalid_targets",
                    details=[ErrorDetail(f"targets.edges[{position}].{end}", end_id, "an id in graph.nodes")],
                )


def _check_node_ids(payload: GraphPayload) -> list[NodeKey]:
    seen: dict[str, tuple[int, NodeKey]] = {}
    node_ids: list[NodeKey] = []
    for position, node in enumerate(payload.nodes):
        # Keyed by the text form, so 1 and "1" collide here as they would in
        # any consumer that reads ids back from JSON object keys or CSV.
        text = str(node.id)
        if text in seen:
            first_position, first_id = seen[text]
            same = type(first_id) is type(node.id)
            reason = (
                "appears twice" if same else f"collides with {first_id!r} at graph.nodes[{first_position}]"
            )
            raise RequestRejected(
                f"graph.nodes[{position}].id {node.id!r} {reason}; node ids must be unique, and one "
                "graph may not hold both an integer and a string with the same digits",
                code="invalid_graph",
                details=[ErrorDetail(f"graph.nodes[{position}].id", node.id, "unique node ids")],
            )
        seen[text] = (position, node.id)
        node_ids.append(node.id)
    return node_ids


def _feature_matrix(payload: GraphPayload, node_ids: Sequence[NodeKey]) -> sp.csr_matrix | None:
    with_features = [node for node in payload.nodes if node.features is not None]
    if not with_features:
        return None

    dim: int | None = None
    dim_source = ""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for position, node in enumerate(payload.nodes):
        if node.features is None:
            raise RequestRejected(
                f"graph.nodes[{position}] (id {node.id!r}) has no features while other nodes do; "
                "give every node features of the same dimension, or none",
                code="invalid_graph",
                details=[ErrorDetail(f"graph.nodes[{position}].features", None, f"dimension {dim}")],
            )
        if isinstance(node.features, SparseFeatures):
            node_dim = node.features.dim
            rows.extend([position] * len(node.features.indices))
            cols.extend(node.features.indices)
            values.extend(float(value) for value in node.features.values)
        else:
            node_dim = len(node.features)
            for column, value in enumerate(node.features):
                if value != 0:
                    rows.append(position)
                    cols.append(column)
                    values.append(float(value))
        if dim is None:
            dim, dim_source = node_dim, f"graph.nodes[{position}]"
        elif node_dim != dim:
            raise RequestRejected(
                f"graph.nodes[{position}].features has dimension {node_dim}, but {dim_source} has "
                f"{dim}; every node of a graph must use the same feature dimension",
                code="invalid_graph",
                details=[ErrorDetail(f"graph.nodes[{position}].features", node_dim, dim)],
            )

    assert dim is not None
    return sp.csr_matrix(
        (
            np.asarray(values, dtype=np.float64),
            (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)),
        ),
        shape=(len(node_ids), dim),
    )
