"""Edge-level extractors: one row of features per scored (source, target) pair.

The link scores follow networkx's definitions (``common_neighbors``,
``jaccard_coefficient``, ``adamic_adar_index``, ``resource_allocation_index``,
``preferential_attachment``) on the simple undirected view, which networkx
3.6.1 would reject for multigraphs and, for Jaccard, directed graphs. They are
computed from cached neighbour sets: a Python set intersection walks the
smaller set, so a pair costs O(min(d_u, d_v)) where networkx's Jaccard costs
O(d_u + d_v) and becomes quadratic when every pair touches one hub.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from graphinfer.models.extractors.views import degrees, neighbour_sets
from graphinfer.models.features import REGISTRY, EdgeExtractor, Param
from graphinfer.models.graph import GraphInput

SIMPLE_VIEW_MULTIGRAPH = "parallel edges collapse into one edge; edge attributes are not read"
SIMPLE_VIEW_SELF_LOOPS = "dropped: a node is not its own neighbour"
SIMPLE_VIEW_DIRECTION = "ignored: neighbours are linked either way, and (u, v) scores the same as (v, u)"
# For p distinct pairs the total of min(d_u, d_v) is O(m sqrt(p)): only 2m / k nodes
# have degree k or more, so at most (2m / k)^2 pairs have a smaller degree of k or more.
PAIR_COST = "O(min(d_u, d_v)) per pair, so O(m * sqrt(p)) for p distinct pairs at worst"


class NeighbourhoodScore(EdgeExtractor):
    """A link score computed from the neighbour sets of the two end nodes."""

    params: ClassVar[Mapping[str, Param]] = {}
    multigraph = SIMPLE_VIEW_MULTIGRAPH
    self_loops = SIMPLE_VIEW_SELF_LOOPS
    direction = SIMPLE_VIEW_DIRECTION
    cost = PAIR_COST

    def score_pairs(
        self, graph_input: GraphInput, params: Mapping[str, Any], pairs: np.ndarray
    ) -> np.ndarray:
        neighbours = neighbour_sets(graph_input)
        node_degrees = degrees(graph_input).tolist()
        rows = np.empty((len(pairs), 1), dtype=np.float64)
        for position, (u, v) in enumerate(pairs.tolist()):
            rows[position, 0] = self.score(neighbours, node_degrees, u, v)
        return rows

    @abstractmethod
    def score(self, neighbours: list[set[int]], node_degrees: list[int], u: int, v: int) -> float:
        """Return the score of the pair of rows ``u`` and ``v``."""


def _common(neighbours: list[set[int]], u: int, v: int) -> set[int]:
    return neighbours[u] & neighbours[v]


@REGISTRY.register
class CommonNeighbours(NeighbourhoodScore):
    """Number of nodes adjacent to both ends. For a pair (u, u) it is u's degree."""

    name = "common_neighbors"
    version = 1

    def score(self, neighbours: list[set[int]], node_degrees: list[int], u: int, v: int) -> float:
        return float(len(_common(neighbours, u, v)))


@REGISTRY.register
class Jaccard(NeighbourhoodScore):
    """Common neighbours divided by the size of the union of both neighbourhoods; 0 when both are empty."""

    name = "jaccard"
    version = 1

    def score(self, neighbours: list[set[int]], node_degrees: list[int], u: int, v: int) -> float:
        common = len(_common(neighbours, u, v))
        union = node_degrees[u] + node_degrees[v] - common
        return common / union if union else 0.0


@REGISTRY.register
class AdamicAdar(NeighbourhoodScore):
    """Sum of 1 / log(degree) over the common neighbours.

    A common neighbour of two distinct nodes has degree 2 or more. For a pair
    (u, u), neighbours of degree 1 are skipped because log 1 is 0.
    """

    name = "adamic_adar"
    version = 1

    def score(self, neighbours: list[set[int]], node_degrees: list[int], u: int, v: int) -> float:
        common = _common(neighbours, u, v)
        # fsum is exactly rounded, so the set's iteration order does not matter.
        return math.fsum(1.0 / math.log(node_degrees[w]) for w in common if node_degrees[w] > 1)


@REGISTRY.register
class ResourceAllocation(NeighbourhoodScore):
    """Sum of 1 / degree over the common neighbours."""

    name = "resource_allocation"
    version = 1

    def score(self, neighbours: list[set[int]], node_degrees: list[int], u: int, v: int) -> float:
        return math.fsum(1.0 / node_degrees[w] for w in _common(neighbours, u, v))


@REGISTRY.register
class PreferentialAttachment(NeighbourhoodScore):
    """Product of the two ends' degrees."""

    name = "preferential_attachment"
    version = 1
    cost = "O(1) per pair"

    def score(self, neighbours: list[set[int]], node_degrees: list[int], u: int, v: int) -> float:
        return float(node_degrees[u] * node_degrees[v])


@REGISTRY.register
class FeatureSimilarity(EdgeExtractor):
    """Similarity of the two ends' rows of a node extractor, such as their SGC features.

    ``measure`` 'cosine' gives the cosine of the angle between the rows (0
    when either row is all zeros); 'dot' gives their dot product.
    """

    name = "feature_similarity"
    version = 1
    params: ClassVar[Mapping[str, Param]] = {
        "base": Param(
            {"name": "sgc", "version": 1}, "spec", "Node extractor whose rows are compared.", task="node"
        ),
        "measure": Param("cosine", "choice", "Similarity measure.", choices=("cosine", "dot")),
    }
    multigraph = "as the base node extractor states"
    self_loops = "as the base node extractor states"
    direction = "as the base node extractor states; (u, v) scores the same as (v, u)"
    cost = "O(non-zeros of the two rows) per pair, plus the cost of base"

    def score_pairs(
        self, graph_input: GraphInput, params: Mapping[str, Any], pairs: np.ndarray
    ) -> np.ndarray:
        assert self.registry is not None
        base = self.registry.full_result(params["base"], graph_input)
        matrix = sp.csr_matrix(base, dtype=np.float64)
        if len(pairs) == 0:
            return np.zeros((0, 1), dtype=np.float64)
        sources = matrix[pairs[:, 0]]
        targets = matrix[pairs[:, 1]]
        dots = np.asarray(sources.multiply(targets).sum(axis=1)).ravel()
        if params["measure"] == "dot":
            return dots.reshape(-1, 1)
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        scale = norms[pairs[:, 0]] * norms[pairs[:, 1]]
        cosine = np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0)
        return cosine.reshape(-1, 1)
