"""OpenTelemetry trace export: spans from the gateway and the worker reach an OTLP/HTTP receiver.

The receiver is a small ``http.server`` on loopback that decodes the
``ExportTraceServiceRequest`` bodies the SDK's exporter posts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.server
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage
from opentelemetry.sdk.trace import TracerProvider

from graphinfer import tracing
from graphinfer.api.tracing import trace_context
from graphinfer.logs import SecretFilter
from graphinfer.models import datasets
from graphinfer.settings import trace_export_secrets
from tests.conftest import WorkerProcess, launch_worker, private_environment, stop_worker
from tests.gateway_process import GatewayProcess, start_gateway

API_KEY = "key-trace-0123456789"
EXPORT_TOKEN = "otlp-token-5d1c9e"
ENDPOINT_PASSWORD = "otlp-password-77a2"
# The OTLP/HTTP exporter's default endpoint is localhost:4318.
SDK_DEFAULT_PORT = 4318


# --- receiver -------------------------------------------------------------------------


@dataclass
class ReceivedSpan:
    service: str
    resource: dict[str, str]
    span: SpanMessage

    @property
    def attributes(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for attribute in self.span.attributes:
            kind = attribute.value.WhichOneof("value")
            values[attribute.key] = getattr(attribute.value, kind) if kind else None
        return values


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver on a loopback port, keeping every request it gets."""

    server: http.server.ThreadingHTTPServer
    requests: list[tuple[dict[str, str], ExportTraceServiceRequest]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def spans(self) -> list[ReceivedSpan]:
        found: list[ReceivedSpan] = []
        for _, request in list(self.requests):
            for resource_spans in request.resource_spans:
                resource = {
                    attribute.key: attribute.value.string_value
                    for attribute in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    found.extend(
                        ReceivedSpan(resource.get("service.name", ""), resource, span)
                        for span in scope_spans.spans
                    )
        return found

    def wait_for(self, condition: Any, timeout_s: float = 15.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if condition(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver did not get the expected spans; it has {spans}")
            time.sleep(0.05)


def start_receiver(port: int = 0) -> Receiver:
    received: list[tuple[dict[str, str], ExportTraceServiceRequest]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            received.append(({name.lower(): value for name, value in self.headers.items()}, request))
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True).start()
    return Receiver(server, received)


@contextlib.contextmanager
def running_receiver(port: int = 0) -> Iterator[Receiver]:
    receiver = start_receiver(port)
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def without_otel(environment: dict[str, str]) -> dict[str, str]:
    """Drop OpenTelemetry variables the test runner may have, so each test sets its own."""
    return {key: value for key, value in environment.items() if not key.startswith("OTEL_")}


# --- unit tests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "shown"),
    [
        ("http://127.0.0.1:4318/v1/traces", "http://127.0.0.1:4318/v1/traces"),
        (
            "https://user:secret@collector.example:4318/v1/traces",
            "https://***@collector.example:4318/v1/traces",
        ),
        ("https://token@collector.example/v1/traces", "https://***@collector.example/v1/traces"),
        ("https://collector.example/v1/traces?api_key=secret", "https://collector.example/v1/traces?***"),
        ("https://a:b@c@collector.example/", "https://***@collector.example/"),
        ("collector:4318", "collector:4318"),
        ("http://[::1/v1/traces", "(an endpoint that is not a valid URL)"),
    ],
)
def test_mask_endpoint_hides_credentials(endpoint: str, shown: str) -> None:
    assert tracing.mask_endpoint(endpoint) == shown


def test_trace_export_secrets_masked_in_logs() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20tok-1234,x-scope=acme",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:pw-5678@collector.example/?key=k-9999",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://tok-abcd@collector.example/v1/traces",
    }
    secrets = trace_export_secrets(environ)
    for expected in ("Bearer tok-1234", "Bearer%20tok-1234", "acme", "pw-5678", "k-9999", "tok-abcd"):
        assert expected in secrets
    assert "user" not in secrets, "a user name next to a password is not a secret"

    record = logging.LogRecord("opentelemetry", logging.ERROR, "", 0, "export failed: %s", ("pw-5678",), None)
    SecretFilter(secrets).filter(record)
    assert record.getMessage() == "export failed: ***"


@pytest.mark.parametrize(
    ("environ", "endpoint"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "   "}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http://collector:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4318/otlp?tenant=a"},
            "https://collector:4318/otlp/v1/traces?tenant=a",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/custom"},
            "http://collector:4318/custom",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/v1/traces",
            },
            "http://traces:4318/v1/traces",
        ),
    ],
)
def test_traces_endpoint_resolution(environ: dict[str, str], endpoint: str | None) -> None:
    assert tracing.traces_endpoint(environ) == endpoint


@pytest.mark.parametrize(
    "header",
    [
        None,
        "garbage",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    ],
)
def test_parse_traceparent_rejects_invalid(header: str | None) -> None:
    assert tracing.parse_traceparent(header) is None


def test_trace_context_normalises_header() -> None:
    header = " 00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01 "
    assert trace_context(header) == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_configure_without_endpoint_creates_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    threads_before = {thread.ident for thread in threading.enumerate()}

    with caplog.at_level(logging.INFO, logger="graphinfer.tracing"):
        provider = tracing.configure("graphinfer-worker")

    assert provider is None
    assert tracing.tracer() is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert {thread.ident for thread in threading.enumerate()} <= threads_before, "no exporter thread"
    assert "trace export off" in caplog.text
    tracing.shutdown()


def test_configure_disabled_sdk_ignores_endpoint(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9/")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")

    with caplog.at_level(logging.INFO, logger="graphinfer.tracing"):
        provider = tracing.configure("graphinfer-gateway")

    assert provider is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert "trace export off: OTEL_SDK_DISABLED=true" in caplog.text


def test_configure_rejects_endpoint_without_scheme(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4318")

    with caplog.at_level(logging.INFO, logger="graphinfer.tracing"):
        provider = tracing.configure("graphinfer-worker")

    assert provider is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert "is not an http:// or https:// URL" in caplog.text
    assert "http://127.0.0.1:4318" in caplog.text


# --- end to end ------------------------------------------------------------------------


@dataclass
class TracedServices:
    receiver: Receiver
    worker: WorkerProcess
    gateway: GatewayProcess
    request_topic: str


@pytest.fixture(scope="module")
def traced(worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedServices]:
    """A worker and a gateway of their own, exporting spans to a receiver."""
    prefix = f"otel{uuid.uuid4().hex[:8]}"
    base = private_environment(without_otel(worker.environment), prefix)
    base.update(
        {
            "GRAPHINFER_API_KEYS": f"tenant-t={API_KEY}",
            "GRAPHINFER_WORKER_METRICS_PORT": "0",
            "GRAPHINFER_POOL_PROCESSES": "1",
            "OTEL_EXPORTER_OTLP_HEADERS": f"x-export-token={EXPORT_TOKEN}",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
            # Export within 100 ms instead of the SDK's 5 s, so the test need not stop the services.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "NO_PROXY": "127.0.0.1",
        }
    )
    logs = tmp_path_factory.mktemp("traced")
    with running_receiver() as receiver:
        # The worker names the base endpoint with user info, the gateway the traces endpoint.
        worker_environment = {
            **base,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://graphinfer:{ENDPOINT_PASSWORD}@127.0.0.1:{receiver.port}",
        }
        gateway_environment = {
            **base,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/traces",
        }
        # The worker's group join takes seconds, so the gateway starts meanwhile.
        with ThreadPoolExecutor(max_workers=1) as executor:
            starting_worker = executor.submit(launch_worker, worker_environment, logs / "worker.log")
            try:
                gateway = start_gateway(gateway_environment, logs / "gateway.log")
            except BaseException:
                # launch_worker stops a worker that fails to start by itself.
                with contextlib.suppress(BaseException):
                    stop_worker(starting_worker.result())
                raise
            try:
                traced_worker = starting_worker.result()
            except BaseException:
                gateway.stop()
                raise
        try:
            yield TracedServices(receiver, traced_worker, gateway, base["GRAPHINFER_REQUEST_TOPIC"])
        finally:
            gateway.stop()
            stop_worker(traced_worker)


def _hex(value: bytes) -> str:
    return value.hex()


@pytest.mark.integration
async def test_predict_spans_share_callers_trace(traced: TracedServices, database_url: str) -> None:
    trace_id, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    request_id = f"req-{uuid.uuid4().hex[:16]}"
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    headers = {"Authorization": f"Bearer {API_KEY}", "traceparent": f"00-{trace_id}-{caller_span}-01"}
    async with httpx.AsyncClient(base_url=traced.gateway.url, timeout=30, headers=headers) as client:
        response = await client.post("/v1/predict", json=datasets.mutag_request(test[0], request_id))
    assert response.status_code == 200, response.text

    returned = response.headers["traceparent"]
    match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", returned)
    assert match is not None, returned
    assert match.group(1) == trace_id
    gateway_span_id = match.group(2)
    assert gateway_span_id != caller_span, "the gateway forwards its own span, not the caller's"

    def both_services(spans: list[ReceivedSpan]) -> bool:
        ours = [span for span in spans if _hex(span.span.trace_id) == trace_id]
        return {span.service for span in ours} >= {"graphinfer-gateway", "graphinfer-worker"} and any(
            span.span.name.startswith("model ") for span in ours
        )

    spans = [
        span
        for span in await asyncio.to_thread(traced.receiver.wait_for, both_services)
        if _hex(span.span.trace_id) == trace_id
    ]
    [server] = [span for span in spans if span.service == "graphinfer-gateway"]
    assert server.span.name == "POST /v1/predict"
    assert server.span.kind == SpanMessage.SPAN_KIND_SERVER
    assert _hex(server.span.span_id) == gateway_span_id
    assert _hex(server.span.parent_span_id) == caller_span
    assert server.attributes["graphinfer.request_id"] == request_id
    assert server.attributes["graphinfer.tenant"] == "tenant-t"
    assert server.attributes["http.response.status_code"] == 200
    assert API_KEY not in repr(server.attributes), "the API key never becomes an attribute"
    assert server.resource["deployment.environment.name"] == "test"

    [consumer] = [span for span in spans if span.span.kind == SpanMessage.SPAN_KIND_CONSUMER]
    assert consumer.service == "graphinfer-worker"
    assert consumer.span.name == f"process {traced.request_topic}"
    assert _hex(consumer.span.parent_span_id) == gateway_span_id
    assert consumer.attributes["graphinfer.request_id"] == request_id
    assert consumer.attributes["graphinfer.source"] == "online"
    assert consumer.attributes["graphinfer.status"] == "ok"
    assert consumer.attributes["messaging.system"] == "kafka"
    assert consumer.attributes["messaging.destination.name"] == traced.request_topic
    assert consumer.attributes["messaging.destination.partition.id"].isdigit()
    assert consumer.attributes["messaging.kafka.offset"] >= 0
    assert server.span.start_time_unix_nano <= consumer.span.start_time_unix_nano
    assert consumer.span.start_time_unix_nano <= consumer.span.end_time_unix_nano
    assert consumer.span.status.code != consumer.span.status.STATUS_CODE_ERROR

    [model] = [span for span in spans if span.span.name.startswith("model ")]
    assert re.fullmatch(r"model mutag-wl@\d+", model.span.name)
    assert _hex(model.span.parent_span_id) == _hex(consumer.span.span_id)
    assert consumer.span.start_time_unix_nano <= model.span.start_time_unix_nano
    assert model.span.end_time_unix_nano <= consumer.span.end_time_unix_nano

    connection = await asyncpg.connect(database_url)
    try:
        stored = await connection.fetchval(
            "SELECT traceparent FROM inference_requests WHERE request_id = $1", request_id
        )
    finally:
        await connection.close()
    assert stored == returned

    export_headers = [headers for headers, _ in traced.receiver.requests]
    assert all(headers.get("x-export-token") == EXPORT_TOKEN for headers in export_headers)
    assert "application/x-protobuf" in export_headers[0]["content-type"]


@pytest.mark.integration
async def test_async_request_span_starts_trace(traced: TracedServices) -> None:
    request_id = f"req-{uuid.uuid4().hex[:16]}"
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    headers = {"Authorization": f"Bearer {API_KEY}", "traceparent": "not-a-traceparent"}
    async with httpx.AsyncClient(base_url=traced.gateway.url, timeout=30, headers=headers) as client:
        response = await client.post("/v1/requests", json=datasets.mutag_request(test[1], request_id))
    assert response.status_code == 202, response.text
    # Flags 03: sampled, and the SDK marks a trace id it generated as random (W3C Trace Context level 2).
    match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-0[13]", response.headers["traceparent"])
    assert match is not None, response.headers["traceparent"]
    trace_id, span_id = match.groups()

    # The two processes export independently, so either span may arrive first.
    def both_arrived(spans: list[ReceivedSpan]) -> bool:
        ours = [span for span in spans if _hex(span.span.trace_id) == trace_id]
        return any(_hex(span.span.span_id) == span_id for span in ours) and any(
            span.span.kind == SpanMessage.SPAN_KIND_CONSUMER for span in ours
        )

    spans = await asyncio.to_thread(traced.receiver.wait_for, both_arrived)
    [server] = [span for span in spans if _hex(span.span.span_id) == span_id]
    assert server.span.name == "POST /v1/requests"
    assert server.span.parent_span_id == b"", "a malformed traceparent starts a new trace"
    assert server.attributes["http.response.status_code"] == 202


@pytest.mark.integration
async def test_rejected_and_replayed_message_spans(traced: TracedServices) -> None:
    environment = traced.gateway.environment
    trace_id = uuid.uuid4().hex
    rejected_id, replayed_id = f"req-{uuid.uuid4().hex[:16]}", f"req-{uuid.uuid4().hex[:16]}"
    _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
    producer = AIOKafkaProducer(bootstrap_servers=environment["GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS"])
    await producer.start()
    try:
        await producer.send_and_wait(
            traced.request_topic,
            b"{not json",
            key=rejected_id.encode(),
            headers=[("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01".encode())],
        )
        await producer.send_and_wait(
            environment["GRAPHINFER_REPLAY_TOPIC"],
            json.dumps(datasets.mutag_request(test[3], replayed_id)).encode(),
            key=replayed_id.encode(),
        )
    finally:
        await producer.stop()

    def consumer_span(spans: list[ReceivedSpan], request_id: str) -> ReceivedSpan | None:
        for span in spans:
            if span.span.kind == SpanMessage.SPAN_KIND_CONSUMER:
                if span.attributes.get("graphinfer.request_id") == request_id:
                    return span
        return None

    spans = await asyncio.to_thread(
        traced.receiver.wait_for,
        lambda spans: consumer_span(spans, rejected_id) and consumer_span(spans, replayed_id),
    )
    rejected = consumer_span(spans, rejected_id)
    assert rejected is not None
    assert _hex(rejected.span.trace_id) == trace_id
    assert rejected.attributes["graphinfer.status"] == "rejected"
    assert rejected.attributes["graphinfer.error_code"] == "invalid_json"
    assert rejected.span.status.code == rejected.span.status.STATUS_CODE_ERROR

    replayed = consumer_span(spans, replayed_id)
    assert replayed is not None
    assert replayed.span.parent_span_id == b"", "a replayed message without traceparent starts a trace"
    assert replayed.attributes["graphinfer.source"] == "replay"
    assert replayed.attributes["messaging.destination.name"] == environment["GRAPHINFER_REPLAY_TOPIC"]
    assert replayed.attributes["graphinfer.status"] == "ok"


@pytest.mark.integration
def test_export_logs_hide_credentials(traced: TracedServices) -> None:
    worker_log, gateway_log = traced.worker.log(), traced.gateway.log()
    port = traced.receiver.port
    assert f"trace export on endpoint=http://***@127.0.0.1:{port}/v1/traces service=graphinfer-worker" in (
        worker_log
    )
    assert f"trace export on endpoint=http://127.0.0.1:{port}/v1/traces service=graphinfer-gateway" in (
        gateway_log
    )
    for log in (worker_log, gateway_log):
        assert ENDPOINT_PASSWORD not in log
        assert EXPORT_TOKEN not in log


def _receiver_on_default_port() -> Receiver:
    # Listening where the exporter sends by default catches an exporter created by mistake.
    try:
        return start_receiver(SDK_DEFAULT_PORT)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        return start_receiver()


@pytest.mark.integration
async def test_no_endpoint_sends_nothing(
    worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    receiver = _receiver_on_default_port()
    try:
        environment = {
            **without_otel(worker.environment),
            "OTEL_SERVICE_NAME": "graphinfer-untraced",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "GRAPHINFER_API_KEYS": f"tenant-t={API_KEY}",
        }
        gateway = start_gateway(environment, tmp_path_factory.mktemp("untraced") / "gateway.log")
        try:
            request_id = f"req-{uuid.uuid4().hex[:16]}"
            _, test = datasets.mutag_holdout_split(datasets.load_mutag(), seed=0)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=headers) as client:
                response = await client.post("/v1/predict", json=datasets.mutag_request(test[2], request_id))
            assert response.status_code == 200, response.text
        finally:
            # Stopping would flush any span an exporter still held.
            gateway.stop()
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()

    assert receiver.requests == []
    assert "trace export off: no endpoint" in gateway.log()
    assert "trace export off: no endpoint" in worker.log()
