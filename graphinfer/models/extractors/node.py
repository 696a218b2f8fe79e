"""Node-level extractors: one row of features per node, in ``GraphInput.node_ids`` order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from graphinfer.models.extractors.views import incompatible as _incompatible
from graphinfer.models.extractors.views import undirected_adjacency
from graphinfer.models.features import REGISTRY, Extractor, Param
from graphinfer.models.graph import GraphInput


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
