"""The gateway's Prometheus metrics, in a registry of their own per app."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics", "MetricsMiddleware"]

REPLY_OUTCOMES = ("matched", "duplicate", "late", "foreign")
WAIT_OUTCOMES = ("replied", "stored", "timeout", "disconnected")


class GatewayMetrics:
    """Counters and gauges of one gateway replica."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "graphinfer_gateway_http_requests",
            "HTTP requests answered, by route template and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "graphinfer_gateway_http_request_duration_seconds",
            "Time from receiving an HTTP request to sending the start of its response.",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "graphinfer_gateway_in_flight_requests",
            "POST requests this replica is handling now.",
            registry=self.registry,
        )
        self.pending_replies = Gauge(
            "graphinfer_gateway_pending_replies",
            "Waiters registered for a reply on the leased partition.",
            registry=self.registry,
        )
        self.replies = Counter(
            "graphinfer_gateway_replies",
            "Replies read from the leased partition: matched a waiter; duplicate of one already "
            "matched; late, after its waiter left; foreign, for a request this replica never published.",
            ["outcome"],
            registry=self.registry,
        )
        self.waits = Counter(
            "graphinfer_gateway_waits",
            "How synchronous predictions ended: replied, found stored, timed out or client disconnected.",
            ["outcome"],
            registry=self.registry,
        )
        self.published = Counter(
            "graphinfer_gateway_published_requests",
            "Requests published to the request topic.",
            registry=self.registry,
        )
        self.reply_partition = Gauge(
            "graphinfer_gateway_reply_partition",
            "Partition of the reply topic this replica leases; -1 while it leases none.",
            registry=self.registry,
        )
        self.ready = Gauge(
            "graphinfer_gateway_ready",
            "1 when the broker and database answer and a reply partition is leased, else 0.",
            registry=self.registry,
        )
        for outcome in REPLY_OUTCOMES:
            self.replies.labels(outcome)
        for outcome in WAIT_OUTCOMES:
            self.waits.labels(outcome)
        self.reply_partition.set(-1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Count every HTTP response by route template, method and status (a plain ASGI middleware).

    It does not wrap ``receive``, so an endpoint still receives the client's
    disconnect as soon as the server does.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope.get("method", "")
        status = 500

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.http_duration.labels(_route(scope), method).observe(
                    time.perf_counter() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, send_and_observe)
        finally:
            self.metrics.http_requests.labels(_route(scope), method, str(status)).inc()


def _route(scope: Scope) -> str:
    # The router stores the matched route in the scope; its template keeps the label set small.
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
