"""The worker's counters, in one prometheus_client registry.

:func:`serve` exposes :data:`REGISTRY` on ``GRAPHINFER_WORKER_METRICS_PORT``,
and :func:`summary` turns the counters into one log line, which the worker
writes when it stops.

The inference processes cannot write to this registry: they are separate
processes. Each one sends its observations back on the pipe with every
answer (see :mod:`graphinfer.models.pool`), and :func:`record_pool`
applies them here, so they reach the same scrape. Consumer lag is computed
at scrape time by a :class:`LagCollector`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES = Counter(
    "graphinfer_worker_messages",
    "Request messages the worker finished, by source (online or replay) and outcome (the reply "
    "status; a message without a readable request_id counts as rejected and is only dead-lettered).",
    ["source", "outcome"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "graphinfer_worker_rejections",
    "Requests answered with an error of their own (rejected, expired, or failed with code internal), "
    "by source and error code; model failures are counted in graphinfer_worker_model_results.",
    ["source", "code"],
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
    ["model", "version"],
    registry=REGISTRY,
)
MODEL_RESULTS = Counter(
    "graphinfer_worker_model_results",
    "Model results, by model and by status or error code.",
    ["model", "version", "outcome"],
    registry=REGISTRY,
)
END_TO_END = Histogram(
    "graphinfer_worker_end_to_end_seconds",
    "Seconds from the worker receiving a message to its reply being delivered.",
    registry=REGISTRY,
)
DATABASE_WRITE = Histogram(
    "graphinfer_worker_database_write_seconds",
    "Seconds one successful batch write (requests, predictions, dead letters) took; failed "
    'attempts are counted in graphinfer_worker_retries{step="store"}.',
    registry=REGISTRY,
)

# Inference pool: restarts are seen by the worker, the rest is measured
# inside the inference processes.
POOL_RESTARTS = Counter(
    "graphinfer_pool_restarts",
    "Inference processes replaced, by reason (timeout, out_of_memory, died).",
    ["reason"],
    registry=REGISTRY,
)
MODEL_LOADS = Counter(
    "graphinfer_pool_model_loads",
    "Model loads in inference processes, by model and outcome (loaded, failed); every process "
    "loads every served model.",
    ["model", "version", "outcome"],
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Histogram(
    "graphinfer_pool_model_load_seconds",
    "Seconds an inference process took to verify and load one model.",
    ["model", "version"],
    registry=REGISTRY,
)
MODELS_REFUSED = Gauge(
    "graphinfer_worker_models_refused",
    "Model directories the last repository scan refused (bad manifest, checksum or permissions).",
    registry=REGISTRY,
)
DECODE_SECONDS = Histogram(
    "graphinfer_pool_decode_seconds",
    "Seconds an inference process took to parse one request into a graph.",
    registry=REGISTRY,
)
FEATURE_SECONDS = Histogram(
    "graphinfer_pool_feature_seconds",
    "Seconds an inference process took to compute one request's feature rows for one model.",
    ["model", "version"],
    registry=REGISTRY,
)
PREDICT_SECONDS = Histogram(
    "graphinfer_pool_predict_seconds",
    "Seconds of one stacked model call in an inference process, by model.",
    ["model", "version"],
    registry=REGISTRY,
)
PREDICT_ROWS = Counter(
    "graphinfer_pool_predict_rows",
    "Feature rows scored by the models, by model.",
    ["model", "version"],
    registry=REGISTRY,
)
POOL_MAX_RSS = Gauge(
    "graphinfer_pool_process_max_rss_bytes",
    "Peak resident memory of each inference process, by slot (0 to GRAPHINFER_POOL_PROCESSES - 1); "
    "compare with GRAPHINFER_POOL_MEMORY_LIMIT_MB.",
    ["slot"],
    registry=REGISTRY,
)

# Replay: set by the process that publishes a run; of those, only a worker
# leading the replay serves them. Results are counted in
# graphinfer_worker_messages{source="replay"}.
REPLAY_RECORDS = Gauge(
    "graphinfer_replay_run_records",
    "Records of the replay run this process publishes (or last published), by state: total in the "
    "data set, published so far, published and not yet stored.",
    ["state"],
    registry=REGISTRY,
)
REPLAY_PENDING = Gauge(
    "graphinfer_replay_runs_pending",
    "Runs waiting for the leader, read by the leader when a tick fires and when it takes a run; more "
    "than 1 means runs last longer than the schedule's interval.",
    registry=REGISTRY,
)
REPLAY_RUNS = Counter(
    "graphinfer_replay_runs",
    "Replay runs this process published, by how they ended (finished, released, failed, lost).",
    ["outcome"],
    registry=REGISTRY,
)


# One observation from an inference process: (name, labels, value).
Observation = tuple[str, tuple[str, ...], float]


def record_pool(observations: Iterable[Observation], slot: int) -> None:
    """Apply observations sent by the inference process in ``slot`` to :data:`REGISTRY`.

    Model observations carry the model's ``name@version`` ref as their one
    label; it becomes the ``model`` and ``version`` labels.
    """
    for name, labels, value in observations:
        model = labels[0].rpartition("@")[::2] if labels else ("", "")
        if name == "decode_seconds":
            DECODE_SECONDS.observe(value)
        elif name == "feature_seconds":
            FEATURE_SECONDS.labels(*model).observe(value)
        elif name == "predict_seconds":
            PREDICT_SECONDS.labels(*model).observe(value)
        elif name == "predict_rows":
            PREDICT_ROWS.labels(*model).inc(value)
        elif name == "model_loaded":
            MODEL_LOADS.labels(*model, "loaded").inc()
            MODEL_LOAD_SECONDS.labels(*model).observe(value)
        elif name == "model_failed":
            MODEL_LOADS.labels(*model, "failed").inc()
        elif name == "max_rss_bytes":
            POOL_MAX_RSS.labels(str(slot)).set(value)


# One (topic, partition, lag) per assigned partition.
LagReader = Callable[[], Sequence[tuple[str, int, int]]]


class LagCollector(Collector):
    """``graphinfer_worker_consumer_lag``: messages behind the high watermark, per partition.

    ``read`` runs at scrape time, on the metrics server's thread. It returns
    the partitions assigned to this worker and, for each, the high watermark
    from the last fetch response minus the next offset to finish. The fetch
    response's watermark is right on the embedded broker too, where
    ``end_offsets()`` is not.
    """

    def __init__(self, read: LagReader) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "graphinfer_worker_consumer_lag",
            "Messages on an assigned partition not yet finished by this worker: the high watermark "
            "of the last fetch minus the next offset to finish.",
            labels=["topic", "partition"],
        )
        for topic, partition, lag in self.read():
            family.add_metric([topic, str(partition)], lag)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("graphinfer_worker_consumer_lag", "", labels=["topic", "partition"])


_lag_collector: LagCollector | None = None


def watch_lag(read: LagReader) -> None:
    """Report consumer lag from ``read`` at every scrape (replacing an earlier reader)."""
    global _lag_collector
    if _lag_collector is not None:
        REGISTRY.unregister(_lag_collector)
    _lag_collector = LagCollector(read)
    REGISTRY.register(_lag_collector)


def serve(host: str, port: int) -> int:
    """Serve :data:`REGISTRY` over HTTP on a background thread; return the port it listens on."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)


def summary() -> str:
    """Return every sample but histogram buckets as ``name{labels}=value`` pairs, for one log line."""
    parts: list[str] = []
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            # Histogram buckets would make the line unreadable; _count and _sum stay.
            if sample.name.endswith(("_created", "_bucket")):
                continue
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            name = f"{sample.name}{{{labels}}}" if labels else sample.name
            value = int(sample.value) if float(sample.value).is_integer() else sample.value
            parts.append(f"{name}={value}")
    return " ".join(sorted(parts))
