"""Loaders for the vendored MUTAG and Cora data sets, and builders of v1 requests from them.

Training, the demo and the tests all build their requests here, so the models
are trained on exactly the wire form that the service later receives. The
files sit in :mod:`graphinfer.datasets`; DATA.md gives their sources and terms.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.model_selection import train_test_split

DATA_PACKAGE = "graphinfer.datasets"
MUTAG_FILE = "mutag.jsonl.gz"
CORA_FILE = "cora.json.gz"

#: MUTAG graph labels (mutagenic effect on a bacterium) as served class names.
MUTAG_CLASS_NAMES: dict[int, str] = {1: "mutagenic", -1: "non_mutagenic"}

#: MUTAG node labels are atom type codes. Requests carry the element symbol instead.
MUTAG_ATOM_SYMBOLS: dict[int, str] = {0: "C", 1: "N", 2: "O", 3: "F", 4: "I", 5: "Cl", 6: "Br"}

#: The Planetoid split names used in the Cora file.
CORA_SPLITS = ("train", "val", "test")


def _open_data_file(name: str) -> Any:
    return resources.files(DATA_PACKAGE).joinpath(name).open("rb")


def load_mutag() -> list[dict[str, Any]]:
    """Read the 188 MUTAG records: ``{"id", "label", "directed", "nodes", "edges"}`` each."""
    with _open_data_file(MUTAG_FILE) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def mutag_class_name(record: dict[str, Any]) -> str:
    """Return the class name of one MUTAG record's raw graph label."""
    label = record["label"]
    if label not in MUTAG_CLASS_NAMES:
        raise ValueError(
            f"MUTAG graph {record.get('id')!r} has label {label!r}; "
            f"expected one of {sorted(MUTAG_CLASS_NAMES)}"
        )
    return MUTAG_CLASS_NAMES[label]


def mutag_holdout_split(
    records: Sequence[dict[str, Any]], seed: int = 0, test_fraction: float = 0.2
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split MUTAG records into train and test parts, stratified by class.

    The split depends only on the records, ``seed`` and ``test_fraction``. Both
    parts keep the records' original order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction is {test_fraction!r}; it must lie strictly between 0 and 1")
    labels = [mutag_class_name(record) for record in records]
    positions = np.arange(len(records))
    train_positions, test_positions = train_test_split(
        positions, test_size=test_fraction, random_state=seed, stratify=labels
    )
    train = [records[position] for position in sorted(train_positions)]
    test = [records[position] for position in sorted(test_positions)]
    return train, test


def mutag_request(record: dict[str, Any], request_id: str) -> dict[str, Any]:
    """Build the v1 graph-task request for one MUTAG record.

    Nodes carry the atom's element symbol as ``label``. Edges keep the raw TU
    bond label (0 aromatic, 1 single, 2 double, 3 triple) as ``label``. The
    graph's own class label is left out, so the request carries no ground truth.
    """
    nodes = []
    for node in record["nodes"]:
        atom = node["label"]
        if atom not in MUTAG_ATOM_SYMBOLS:
            raise ValueError(
                f"MUTAG graph {record.get('id')!r} node {node['id']!r} has atom label {atom!r}; "
                f"expected one of {sorted(MUTAG_ATOM_SYMBOLS)}"
            )
        nodes.append({"id": node["id"], "label": MUTAG_ATOM_SYMBOLS[atom]})
    edges = [
        {"source": edge["source"], "target": edge["target"], "label": edge["label"]}
        for edge in record["edges"]
    ]
    return {
        "request_id": request_id,
        "graph": {"directed": False, "multigraph": False, "nodes": nodes, "edges": edges},
        "task": "graph",
    }


@dataclass(frozen=True)
class CoraData:
    """The Cora citation graph with its Planetoid split.

    Node ids run from 0 to N-1, so a node id is also its row in every array.
    ``adjacency`` is the undirected citation graph: symmetric, binary and
    without self-loops (5,278 edges).
    """

    class_names: tuple[str, ...]
    feature_dim: int
    node_ids: np.ndarray
    paper_ids: tuple[str, ...]
    labels: np.ndarray
    split: tuple[str | None, ...]
    feature_indices: tuple[tuple[int, ...], ...]
    adjacency: sp.csr_matrix

    @property
    def number_of_nodes(self) -> int:
        return len(self.node_ids)

    def split_nodes(self, name: str) -> np.ndarray:
        """Return the ids of the nodes in one Planetoid split, in ascending order."""
        if name not in CORA_SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {CORA_SPLITS}")
        return np.asarray([node for node, part in enumerate(self.split) if part == name], dtype=np.int64)

    def class_name(self, node_id: int) -> str:
        return self.class_names[int(self.labels[node_id])]

    def neighbors(self, node_id: int) -> np.ndarray:
        start, end = self.adjacency.indptr[node_id], self.adjacency.indptr[node_id + 1]
        return self.adjacency.indices[start:end]


def load_cora() -> CoraData:
    """Read Cora: class names, sparse binary features, labels, split and undirected edges."""
    with _open_data_file(CORA_FILE) as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
        document = json.load(text)

    class_names = tuple(document["graph"]["classes"])
    feature_dim = int(document["graph"]["num_features"])
    class_index = {name: position for position, name in enumerate(class_names)}
    nodes = document["nodes"]
    node_ids = np.asarray([node["id"] for node in nodes], dtype=np.int64)
    if not np.array_equal(node_ids, np.arange(len(nodes))):
        raise ValueError("Cora node ids must run from 0 to N-1 in file order")

    sources = np.asarray([edge["source"] for edge in document["edges"]], dtype=np.int64)
    targets = np.asarray([edge["target"] for edge in document["edges"]], dtype=np.int64)
    loops = sources == targets
    sources, targets = sources[~loops], targets[~loops]
    size = len(nodes)
    # Citations point one way, but the model reads the symmetric graph. A pair
    # of papers that cite each other still counts as one undirected edge.
    directed = sp.coo_matrix((np.ones(len(sources)), (sources, targets)), shape=(size, size))
    adjacency = (directed + directed.T).tocsr()
    adjacency.data[:] = 1.0
    adjacency.sort_indices()

    return CoraData(
        class_names=class_names,
        feature_dim=feature_dim,
        node_ids=node_ids,
        paper_ids=tuple(str(node["paper_id"]) for node in nodes),
        labels=np.asarray([class_index[node["label"]] for node in nodes], dtype=np.int64),
        split=tuple(node["planetoid_split"] for node in nodes),
        feature_indices=tuple(tuple(int(index) for index in node["features"]) for node in nodes),
        adjacency=adjacency,
    )


def cora_ego_nodes(cora: CoraData, node_id: int, hops: int = 2) -> list[int]:
    """Return the nodes within ``hops`` undirected hops of ``node_id``, in ascending order."""
    if hops < 0:
        raise ValueError(f"hops is {hops}; it must be 0 or more")
    if not 0 <= node_id < cora.number_of_nodes:
        raise ValueError(f"node {node_id} is not a Cora node; ids run from 0 to {cora.number_of_nodes - 1}")
    reached = {int(node_id)}
    frontier = [int(node_id)]
    for _ in range(hops):
        next_frontier = []
        for node in frontier:
            for neighbor in cora.neighbors(node):
                neighbor = int(neighbor)
                if neighbor not in reached:
                    reached.add(neighbor)
                    next_frontier.append(neighbor)
        frontier = next_frontier
    return sorted(reached)


def cora_graph(cora: CoraData, nodes: Sequence[int]) -> dict[str, Any]:
    """Build the undirected v1 ``graph`` object induced by ``nodes`` of Cora.

    Every node carries its bag-of-words in the sparse form; class labels are
    left out. Each undirected edge appears once, as ``source < target``.
    """
    members = set(int(node) for node in nodes)
    graph_nodes = _cora_nodes(cora, nodes)
    edges = []
    for source in nodes:
        for target in cora.neighbors(int(source)):
            target = int(target)
            if target > source and target in members:
                edges.append({"source": int(source), "target": target})
    return {"directed": False, "multigraph": False, "nodes": graph_nodes, "edges": edges}


def _cora_nodes(cora: CoraData, nodes: Sequence[int]) -> list[dict[str, Any]]:
    return [
        {
            "id": int(node),
            "features": {
                "indices": list(cora.feature_indices[node]),
                "values": [1.0] * len(cora.feature_indices[node]),
                "dim": cora.feature_dim,
            },
        }
        for node in nodes
    ]


def cora_ego_request(cora: CoraData, node_id: int, request_id: str, hops: int = 2) -> dict[str, Any]:
    """Build the v1 node-task request for one Cora node, on its ``hops``-hop ego subgraph.

    With ``hops`` at least the SGC propagation depth, the centre node gets the
    same SGC features from this subgraph as from the whole graph.
    """
    nodes = cora_ego_nodes(cora, node_id, hops)
    return {
        "request_id": request_id,
        "graph": cora_graph(cora, nodes),
        "task": "node",
        "targets": {"nodes": [int(node_id)]},
    }


def cora_full_request(cora: CoraData, request_id: str) -> dict[str, Any]:
    """Build a v1 node-task request holding all of Cora, with no targets.

    Its JSON form is about 860 kB, close to the default 1,000,000-byte message
    cap, so it serves library callers such as training rather than the wire.
    """
    return {
        "request_id": request_id,
        "graph": cora_graph(cora, range(cora.number_of_nodes)),
        "task": "node",
    }


@dataclass(frozen=True)
class CoraLinkSplit:
    """Cora's undirected edges split for link prediction.

    ``observed_edges`` is the graph the features are computed on: every edge
    except the train and test positives. Pairs are ``(u, v)`` with u < v;
    label 1 marks a held-out edge and 0 a sampled pair that is not an edge
    of the full graph. No pair appears twice across both parts.
    """

    observed_edges: tuple[tuple[int, int], ...]
    train_pairs: tuple[tuple[int, int], ...]
    train_labels: tuple[int, ...]
    test_pairs: tuple[tuple[int, int], ...]
    test_labels: tuple[int, ...]


def cora_link_split(
    cora: CoraData, seed: int = 0, test_fraction: float = 0.1, train_fraction: float = 0.1
) -> CoraLinkSplit:
    """Hold out edges of Cora as positives and sample as many non-edges as negatives, per part.

    A seeded permutation of the 5,278 sorted undirected edges gives the test
    positives first, then the train positives; the rest stay observed. Each
    part gets as many negatives as positives, drawn uniformly from the pairs
    of distinct nodes that are not edges of the full graph. The legacy numpy
    ``RandomState`` is used because its stream is frozen across numpy releases.
    """
    if not (0 < test_fraction and 0 < train_fraction and test_fraction + train_fraction < 1):
        raise ValueError(
            f"test_fraction {test_fraction} and train_fraction {train_fraction} must be positive "
            "and sum to less than 1"
        )
    upper = sp.triu(cora.adjacency, k=1).tocoo()
    edges = sorted(zip(upper.row.tolist(), upper.col.tolist(), strict=True))
    random = np.random.RandomState(seed)
    order = random.permutation(len(edges))
    test_count = int(len(edges) * test_fraction)
    train_count = int(len(edges) * train_fraction)
    test_positive = [edges[position] for position in order[:test_count]]
    train_positive = [edges[position] for position in order[test_count : test_count + train_count]]
    observed = sorted(edges[position] for position in order[test_count + train_count :])

    taken = set(edges)
    test_negative = _sample_non_edges(random, cora.number_of_nodes, test_count, taken)
    train_negative = _sample_non_edges(random, cora.number_of_nodes, train_count, taken)
    return CoraLinkSplit(
        observed_edges=tuple(observed),
        train_pairs=tuple(train_positive + train_negative),
        train_labels=tuple([1] * train_count + [0] * train_count),
        test_pairs=tuple(test_positive + test_negative),
        test_labels=tuple([1] * test_count + [0] * test_count),
    )


def _sample_non_edges(
    random: np.random.RandomState, size: int, count: int, taken: set[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Draw ``count`` distinct pairs u < v outside ``taken``, adding each to ``taken``."""
    pairs: list[tuple[int, int]] = []
    while len(pairs) < count:
        u, v = (int(end) for end in random.randint(0, size, size=2))
        pair = (min(u, v), max(u, v))
        if u != v and pair not in taken:
            taken.add(pair)
            pairs.append(pair)
    return pairs


def cora_link_request(
    cora: CoraData, split: CoraLinkSplit, pairs: Sequence[tuple[int, int]], request_id: str
) -> dict[str, Any]:
    """Build the v1 edge-task request scoring ``pairs`` on the observed Cora graph.

    The graph contains every paper with its words and only the observed edges,
    so a held-out edge is never in the graph it is scored on. The test
    request is about 860 kB as ``json.dumps`` writes it, under the default
    1,000,000-byte message cap.
    """
    return {
        "request_id": request_id,
        "graph": {
            "directed": False,
            "multigraph": False,
            "nodes": _cora_nodes(cora, range(cora.number_of_nodes)),
            "edges": [{"source": u, "target": v} for u, v in split.observed_edges],
        },
        "task": "edge",
        "targets": {"edges": [{"source": u, "target": v} for u, v in pairs]},
    }
