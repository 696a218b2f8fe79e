"""OpenTelemetry trace export, on only when an OTLP endpoint is configured.

:func:`configure` reads OpenTelemetry's standard environment variables.
Export is on when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and off when
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Spans go out
over OTLP/HTTP with protobuf bodies. When export is off, nothing is created:
no tracer provider, no exporter, no thread and no socket, and the helpers
here return at once.

The SDK itself reads ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_HEADERS`` and the ``OTEL_BSP_*``
batch settings. Only the service name gets a default here.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

logger = logging.getLogger(__name__)

TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
BASE_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
_TRACES_PATH = "v1/traces"
_SUPPORTED_PROTOCOL = "http/protobuf"
_INSTRUMENTATION_SCOPE = "graphinfer"

# version-traceid-parentid-flags in lower-case hex. Version ff and all-zero ids are invalid.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

_provider: TracerProvider | None = None


# --- set-up ----------------------------------------------------------------------


def configure(service_name: str) -> TracerProvider | None:
    """Install a tracer provider that exports over OTLP/HTTP, or nothing when no endpoint is set.

    ``service_name`` is the default for ``OTEL_SERVICE_NAME``. Returns the
    installed provider, or None when export is off. A second call returns
    the provider of the first.
    """
    global _provider
    if _provider is not None:
        return _provider

    reason = _export_off_reason(os.environ)
    if reason is not None:
        logger.info("trace export off: %s", reason)
        return None
    endpoint = traces_endpoint(os.environ)
    assert endpoint is not None
    if urlsplit(endpoint).scheme not in ("http", "https"):
        logger.error(
            "trace export off: the OTLP endpoint %s is not an http:// or https:// URL; set %s or %s "
            "to one, such as http://127.0.0.1:4318",
            mask_endpoint(endpoint),
            TRACES_ENDPOINT,
            BASE_ENDPOINT,
        )
        return None
    _warn_about_protocol(os.environ)

    # Imported only when export is on, so a process without an endpoint does not load the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=_resource(service_name))
    # The exporter reads the headers, timeout and TLS files from the environment
    # itself. The endpoint is passed in, so that a query string in the base
    # variable stays after the /v1/traces path.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    _provider = provider
    logger.info(
        "trace export on endpoint=%s service=%s",
        mask_endpoint(endpoint),
        provider.resource.attributes.get(SERVICE_NAME),
    )
    return provider


def shutdown() -> None:
    """Export the queued spans and stop the exporter. Does nothing when export is off."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return
    provider.shutdown()
    logger.info("trace export stopped")


def traces_endpoint(environ: Mapping[str, str]) -> str | None:
    """Return the URL spans are sent to, as the OTLP/HTTP exporter derives it, or None when none is set.

    The traces variable is used as it is. The base variable gets the
    ``v1/traces`` path appended, as the OTLP exporter specification requires.
    """
    traces = environ.get(TRACES_ENDPOINT, "").strip()
    if traces:
        return traces
    base = environ.get(BASE_ENDPOINT, "").strip()
    if not base:
        return None
    try:
        parts = urlsplit(base)
    except ValueError:
        return f"{base.removesuffix('/')}/{_TRACES_PATH}"
    return urlunsplit(parts._replace(path=f"{parts.path.removesuffix('/')}/{_TRACES_PATH}"))


def mask_endpoint(url: str) -> str:
    """Return the endpoint without its credentials: user info and query string become ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an endpoint that is not a valid URL)"
    if not parts.netloc:
        # Without "//" urlsplit finds no host, so mask up to the last "@" all the same.
        address, _, query = url.partition("?")
        userinfo = "***@" if "@" in address else ""
        return f"{userinfo}{address.rpartition('@')[2]}{'?***' if query else ''}"
    host = parts.netloc.rpartition("@")[2]
    userinfo = "***@" if "@" in parts.netloc else ""
    query = "?***" if parts.query else ""
    return f"{parts.scheme}://{userinfo}{host}{parts.path}{query}"


def _export_off_reason(environ: Mapping[str, str]) -> str | None:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "OTEL_SDK_DISABLED=true"
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return "OTEL_TRACES_EXPORTER=none"
    if traces_endpoint(environ) is None:
        return f"no endpoint; set {TRACES_ENDPOINT} or {BASE_ENDPOINT} to export spans over OTLP/HTTP"
    return None


def _warn_about_protocol(environ: Mapping[str, str]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip()
        if protocol and protocol != _SUPPORTED_PROTOCOL:
            logger.warning(
                "%s=%s is not supported; spans are exported over %s, so point the endpoint at an "
                "OTLP/HTTP receiver (port 4318 by convention)",
                name,
                protocol,
                _SUPPORTED_PROTOCOL,
            )
            return


def _resource(default_service_name: str) -> Resource:
    # Resource.create merges its argument over what the environment sets, so
    # the default service name goes in only when the environment names none.
    from_environment = OTELResourceDetector().detect()
    if from_environment.attributes.get(SERVICE_NAME):
        return Resource.create()
    return Resource.create({SERVICE_NAME: default_service_name})


def tracer() -> trace.Tracer | None:
    """Return graphinfer's tracer, or None when export is off."""
    if _provider is None:
        return None
    return _provider.get_tracer(_INSTRUMENTATION_SCOPE)


# --- trace context ------------------------------------------------------------------


def parse_traceparent(header: str | None) -> SpanContext | None:
    """Return the remote span context of a valid W3C ``traceparent``, or None for a missing or malformed one."""
    if header is None:
        return None
    match = _TRACEPARENT.match(header.strip().lower())
    if match is None or match.group(1) == "ff":
        return None
    trace_id, span_id = int(match.group(2), 16), int(match.group(3), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match.group(4), 16)))


def format_traceparent(span_context: SpanContext) -> str:
    """Return the W3C ``traceparent`` that names ``span_context`` as the parent."""
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def parent_context(header: str | None) -> otel_context.Context | None:
    """Return a context whose current span is the ``traceparent``'s, or None to start a new trace."""
    remote = parse_traceparent(header)
    if remote is None:
        return None
    return trace.set_span_in_context(NonRecordingSpan(remote))


def current_traceparent() -> str | None:
    """Return the ``traceparent`` of the span active in this context, or None when there is none."""
    span_context = trace.get_current_span().get_span_context()
    return format_traceparent(span_context) if span_context.is_valid else None


def annotate_current_span(attributes: Mapping[str, AttributeValue | None]) -> None:
    """Set attributes on the active span, leaving out None values. Does nothing without a recording span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes({key: value for key, value in attributes.items() if value is not None})


# --- worker spans --------------------------------------------------------------------


class ConsumedMessage(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, bytes]: ...


class FinishedRequest(Protocol):
    """A request message whose reply is stored and delivered."""

    @property
    def message(self) -> ConsumedMessage: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def received_at(self) -> datetime: ...
    @property
    def reply(self) -> Mapping[str, Any] | None: ...


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FAILED_STATUSES = frozenset({"failed", "rejected"})


def record_finished(items: Sequence[FinishedRequest], delivered: datetime) -> None:
    """Record one CONSUMER span per finished message, from its receipt to the delivery of its replies.

    The span's parent is the message's ``traceparent`` header when it is
    valid. Otherwise the span starts a trace, which the sampler may drop.
    Each model result with a latency gets a child span ``model NAME@VERSION``.
    """
    consumer_tracer = tracer()
    if consumer_tracer is None:
        return
    end_ns = _nanoseconds(delivered)
    for item in items:
        _record_message(consumer_tracer, item, end_ns)


def _record_message(consumer_tracer: trace.Tracer, item: FinishedRequest, end_ns: int) -> None:
    message, reply = item.message, item.reply or {}
    header = message.headers.get("traceparent")
    parent = parent_context(header.decode("ascii", errors="replace") if header is not None else None)
    start_ns = _nanoseconds(item.received_at)
    status = reply.get("status")
    error_code = (reply.get("error") or {}).get("code")
    attributes: dict[str, AttributeValue | None] = {
        "graphinfer.request_id": item.request_id,
        "graphinfer.source": reply.get("source"),
        "graphinfer.status": status,
        "graphinfer.error_code": error_code,
        # Names from OpenTelemetry's messaging semantic conventions for Kafka.
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": message.topic,
        "messaging.destination.partition.id": str(message.partition),
        "messaging.kafka.offset": message.offset,
    }
    span = consumer_tracer.start_span(
        f"process {message.topic}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={key: value for key, value in attributes.items() if value is not None},
        start_time=start_ns,
    )
    if status in _FAILED_STATUSES:
        # A request whose every model failed has no request-level error code, only per-model ones.
        span.set_status(Status(StatusCode.ERROR, error_code or status))

    completed_at = reply.get("completed_at")
    completed_ns = _nanoseconds(datetime.fromisoformat(completed_at)) if completed_at else None
    # A reply completed before this message arrived is a stored one sent again: its models did not run now.
    if span.is_recording() and completed_ns is not None and start_ns <= completed_ns <= end_ns:
        context = trace.set_span_in_context(span)
        for result in reply.get("results", []):
            _record_model(consumer_tracer, context, result, start_ns, completed_ns)
    span.end(end_time=end_ns)


def _record_model(
    consumer_tracer: trace.Tracer,
    context: otel_context.Context,
    result: Mapping[str, Any],
    earliest_ns: int,
    completed_ns: int,
) -> None:
    latency_ms = result.get("latency_ms")
    if latency_ms is None:
        return
    # NOTE: the pool reports how long a model took, not when it started, so
    # the span is placed to end when the reply was built.
    start_ns = max(earliest_ns, completed_ns - int(latency_ms * 1_000_000))
    error_code = (result.get("error") or {}).get("code")
    attributes: dict[str, AttributeValue | None] = {
        "graphinfer.model": result.get("model"),
        "graphinfer.model_version": result.get("version"),
        "graphinfer.status": result.get("status"),
        "graphinfer.error_code": error_code,
    }
    span = consumer_tracer.start_span(
        f"model {result.get('model')}@{result.get('version')}",
        context=context,
        attributes={key: value for key, value in attributes.items() if value is not None},
        start_time=start_ns,
    )
    if result.get("status") != "ok":
        span.set_status(Status(StatusCode.ERROR, error_code))
    span.end(end_time=completed_ns)


def _nanoseconds(moment: datetime) -> int:
    # Integer arithmetic keeps the microseconds exact, which a float timestamp does not.
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1_000
