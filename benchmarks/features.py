"""Measure the per-graph cost of every registered feature extractor.

Run from the repository root: ``python benchmarks/features.py``. Prints the
machine, then one Markdown table per graph family with the wall time of each
extractor at 100, 1,000, 10,000 and 20,000 nodes:

- Barabási-Albert graphs with m = 3 (about 3n edges, a few large hubs);
- stars (one hub joined to every other node);
- Erdős-Rényi G(n, m) graphs at the edge cap, m = min(100,000, n(n - 1) / 2),
  where 100,000 is the default GRAPHINFER_MAX_EDGES.

Every graph goes through the wire path: a v1 request dict is encoded as JSON
and decoded by ``decode_request`` into a ``GraphInput``. The message-size cap
is raised for this, because a 100,000-edge request is several megabytes; the
node and edge caps stay at their defaults. Nodes carry a ``label`` and 3
sparse features of dimension 64, and edges a positive ``weight``, so that
every extractor has what it reads. Each extractor runs with its default
parameters on a fresh copy of the graph without cached views, so its time
includes building the views it needs. Edge extractors score the graph's
first 20,000 edges (the default GRAPHINFER_MAX_TARGETS).

Times are CPU seconds of this process (``time.process_time``), the best of up
to 3 runs, stopping once runs add up to 0.5 s. The extractors run on one
thread, so on an idle core CPU time is close to wall time, and on a shared
machine it is not inflated by waiting for a core.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import scipy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphinfer.models.decode import Limits, decode_request
from graphinfer.models.features import describe, extract
from graphinfer.models.graph import GraphInput
from graphinfer.models.manifest import FeatureSpec

SIZES = (100, 1_000, 10_000, 20_000)
MAX_EDGES = 100_000
MAX_TARGETS = 20_000
FEATURE_DIM = 64
SEED = 0
LIMITS = Limits(max_message_bytes=64_000_000)
REPEAT_BUDGET_S = 0.5
MAX_REPEATS = 3

# Parameters that make every extractor readable on the benchmark graphs; all others are defaults.
PARAMS: dict[str, dict[str, Any]] = {
    "node_attributes": {"attributes": ["size"]},
    "edge_attribute_statistics": {"attribute": "weight"},
}


def barabasi_albert(size: int) -> nx.Graph:
    return nx.barabasi_albert_graph(size, 3, seed=SEED)


def star(size: int) -> nx.Graph:
    return nx.star_graph(size - 1)


def erdos_renyi_at_cap(size: int) -> nx.Graph:
    return nx.gnm_random_graph(size, min(MAX_EDGES, size * (size - 1) // 2), seed=SEED)


FAMILIES: dict[str, Callable[[int], nx.Graph]] = {
    "Barabási-Albert, m = 3": barabasi_albert,
    "star": star,
    "Erdős-Rényi at the edge cap": erdos_renyi_at_cap,
}


def request_bytes(graph: nx.Graph) -> bytes:
    nodes = [
        {
            "id": int(node),
            "label": "abc"[int(node) % 3],
            "size": int(node) % 7,
            "features": {
                "indices": sorted({int(node) % FEATURE_DIM, (3 * int(node)) % FEATURE_DIM, 5}),
                "values": [1.0] * len({int(node) % FEATURE_DIM, (3 * int(node)) % FEATURE_DIM, 5}),
                "dim": FEATURE_DIM,
            },
        }
        for node in graph.nodes
    ]
    edges = [
        {"source": int(u), "target": int(v), "weight": 1.0 + (position % 5)}
        for position, (u, v) in enumerate(graph.edges)
    ]
    request = {"request_id": "bench", "graph": {"nodes": nodes, "edges": edges}}
    return json.dumps(request, separators=(",", ":")).encode("utf-8")


def timed(action: Callable[[], Any]) -> float:
    best = float("inf")
    spent = 0.0
    for _ in range(MAX_REPEATS):
        started = time.process_time()
        action()
        elapsed = time.process_time() - started
        best = min(best, elapsed)
        spent += elapsed
        if spent >= REPEAT_BUDGET_S:
            break
    return best


def fresh(graph_input: GraphInput) -> GraphInput:
    return dataclasses.replace(graph_input, cache={})


def measure(graph_input: GraphInput, item: dict[str, Any], pairs: list[tuple[int, int]]) -> float:
    spec = FeatureSpec(name=item["name"], params=PARAMS.get(item["name"], {}), version=item["version"])
    targets = pairs if item["task"] == "edge" else None
    return timed(lambda: extract(spec, fresh(graph_input), item["task"], targets))


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def print_machine() -> None:
    print(f"platform: {platform.platform()}")
    print(f"processor: {platform.processor() or platform.machine()}, CPU count: {os.cpu_count()}")
    print(f"python: {platform.python_version()}")
    print(f"networkx: {nx.__version__}, numpy: {np.__version__}, scipy: {scipy.__version__}")


def main() -> None:
    started = time.perf_counter()
    cpu_started = time.process_time()
    print_machine()
    extractors = describe()
    for family, build in FAMILIES.items():
        columns: list[dict[str, str]] = []
        headers: list[str] = []
        for size in SIZES:
            graph = build(size)
            raw = request_bytes(graph)
            decode_started = time.process_time()
            graph_input = decode_request(raw, LIMITS, require_id=False).graph
            decode_seconds = time.process_time() - decode_started
            pairs = [(int(u), int(v)) for u, v in list(graph.edges)[:MAX_TARGETS]]
            headers.append(f"n={size:,}, m={graph.number_of_edges():,}")
            cells = {
                "(request JSON size)": f"{len(raw) / 1e6:.1f} MB",
                "(decode to GraphInput)": format_seconds(decode_seconds),
            }
            for item in extractors:
                cells[item["name"]] = format_seconds(measure(graph_input, item, pairs))
            columns.append(cells)
        print()
        print(f"### {family}")
        print()
        print("| extractor | " + " | ".join(headers) + " |")
        print("|---|" + "---:|" * len(headers))
        for name in columns[0]:
            print(f"| {name} | " + " | ".join(column[name] for column in columns) + " |")
    print()
    print(
        f"total run time: {time.perf_counter() - started:.0f} s wall, "
        f"{time.process_time() - cpu_started:.0f} s CPU"
    )


if __name__ == "__main__":
    main()
