"""The worker's counters, in one prometheus_client registry.

:func:`serve` exposes :data:`REGISTRY` on ``GRAPHINFER_WORKER_METRICS_PORT``,
and :func:`summary` turns the counters into one log line, which the worker
writes when it stops.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES = Counter(
    "graphinfer_worker_messages",
    "Request messages the worker finished, by outcome (the reply status, or dead_letter for a "
    "message without a recoverable request_id).",
    ["outcome"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "graphinfer_worker_dead_letters",
    "Messages written to the dead-letter topic and table, by error code.",
    ["code"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "graphinfer_worker_retries",
    "Failed attempts of a batch step that the worker retried, by step (read, store, produce).",
    ["step"],
    registry=REGISTRY,
)
BATCH_ERRORS = Counter(
    "graphinfer_worker_batch_errors",
    "Batches whose processing raised an unexpected exception and were retried one message at a time.",
    registry=REGISTRY,
)
ASSIGNMENTS = Counter(
    "graphinfer_worker_partition_assignments",
    "Partition assignments the consumer received; every one after the first is a rebalance.",
    registry=REGISTRY,
)
PAUSED = Gauge(
    "graphinfer_worker_consumption_paused",
    "1 while the worker has paused its partitions because a dependency is unavailable, else 0.",
    registry=REGISTRY,
)
TOPICS_RECREATED = Counter(
    "graphinfer_worker_topics_recreated",
    "Topics that disappeared from the broker and were created again.",
    ["topic"],
    registry=REGISTRY,
)


BATCH_SIZE = Histogram(
    "graphinfer_worker_batch_size",
    "Messages per batch the worker processed.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
MODEL_LATENCY = Histogram(
    "graphinfer_worker_model_latency_seconds",
    "Feature and model time of one model's result for one request, by model.",
    ["model"],
    registry=REGISTRY,
)
MODEL_RESULTS = Counter(
    "graphinfer_worker_model_results",
    "Model results, by model and by status or error code.",
    ["model", "outcome"],
    registry=REGISTRY,
)
END_TO_END = Histogram(
    "graphinfer_worker_end_to_end_seconds",
    "Seconds from the worker receiving a message to its reply being delivered.",
    registry=REGISTRY,
)


def serve(host: str, port: int) -> int:
    """Serve :data:`REGISTRY` over HTTP on a background thread; return the port it listens on."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)


def summary() -> str:
    """Return every counter sample as ``name{labels}=value`` pairs, for one log line."""
    parts: list[str] = []
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            name = f"{sample.name}{{{labels}}}" if labels else sample.name
            value = int(sample.value) if float(sample.value).is_integer() else sample.value
            parts.append(f"{name}={value}")
    return " ".join(sorted(parts))
