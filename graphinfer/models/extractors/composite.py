"""Extractors that place the columns of other extractors of one task side by side.

A model's manifest names one feature spec, so a model that reads several
extractors names one of these with the others as ``parts``. Each part is
computed through the registry and kept in ``GraphInput.cache`` under its own
key, so a part that two models read is computed once per graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from graphinfer.models.features import REGISTRY, EdgeExtractor, Extractor, FullResult, Param
from graphinfer.models.graph import GraphInput

PARTS_MULTIGRAPH = "as each part states"
PARTS_SELF_LOOPS = "as each part states"
PARTS_DIRECTION = "as each part states"
PARTS_COST = "the sum of the parts' costs"


def _parts_param(task: str) -> Param:
    return Param(
        [{"name": "degree", "version": 1}] if task == "node" else [{"name": "graph_size", "version": 1}],
        "spec_list",
        f"The {task} extractors whose columns are joined, in this order.",
        task=task,
    )


def _join(blocks: list[Any]) -> FullResult:
    if any(sp.issparse(block) for block in blocks):
        return sp.hstack([sp.csr_matrix(block) for block in blocks], format="csr", dtype=np.float64)
    return np.hstack([np.asarray(block, dtype=np.float64) for block in blocks])


@REGISTRY.register
class NodeConcat(Extractor):
    """Columns of several node extractors, joined in the order of ``parts``."""

    name = "node_concat"
    version = 1
    task = "node"
    params: ClassVar[Mapping[str, Param]] = {"parts": _parts_param("node")}
    multigraph = PARTS_MULTIGRAPH
    self_loops = PARTS_SELF_LOOPS
    direction = PARTS_DIRECTION
    cost = PARTS_COST

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> FullResult:
        assert self.registry is not None
        registry = self.registry
        blocks = [registry.full_result(part, graph_input) for part in params["parts"]]
        if graph_input.number_of_nodes == 0:
            # A part may report no columns for a graph without nodes (sgc does).
            return np.zeros((0, sum(np.shape(block)[1] for block in blocks)), dtype=np.float64)
        return _join(blocks)


@REGISTRY.register
class GraphConcat(Extractor):
    """Columns of several graph extractors, joined in the order of ``parts``."""

    name = "graph_concat"
    version = 1
    task = "graph"
    params: ClassVar[Mapping[str, Param]] = {"parts": _parts_param("graph")}
    multigraph = PARTS_MULTIGRAPH
    self_loops = PARTS_SELF_LOOPS
    direction = PARTS_DIRECTION
    cost = PARTS_COST

    def compute(self, graph_input: GraphInput, params: Mapping[str, Any]) -> FullResult:
        assert self.registry is not None
        registry = self.registry
        return _join([registry.full_result(part, graph_input) for part in params["parts"]])


@REGISTRY.register
class EdgeConcat(EdgeExtractor):
    """Columns of several edge extractors, joined in the order of ``parts``."""

    name = "edge_concat"
    version = 1
    params: ClassVar[Mapping[str, Param]] = {
        "parts": Param(
            [{"name": "common_neighbors", "version": 1}],
            "spec_list",
            "The edge extractors whose columns are joined, in this order.",
            task="edge",
        )
    }
    multigraph = PARTS_MULTIGRAPH
    self_loops = PARTS_SELF_LOOPS
    direction = PARTS_DIRECTION
    cost = PARTS_COST

    def score_pairs(
        self, graph_input: GraphInput, params: Mapping[str, Any], pairs: np.ndarray
    ) -> np.ndarray:
        assert self.registry is not None
        registry = self.registry
        return np.hstack([registry.pair_rows(part, graph_input, pairs) for part in params["parts"]])
