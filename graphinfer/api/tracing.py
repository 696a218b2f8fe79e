"""W3C trace context and the gateway's SERVER spans.

When trace export is on (:func:`graphinfer.tracing.configure`),
:class:`TracingMiddleware` opens one span per ``POST /v1/predict`` and
``POST /v1/requests``, a child of the caller's valid ``traceparent``, and the
``traceparent`` the gateway forwards names that span. When export is off,
the caller's ``traceparent`` travels unchanged, or a new one is made.
"""

from __future__ import annotations

import secrets
import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graphinfer import tracing

TRACED_ROUTES = frozenset({("POST", "/v1/predict"), ("POST", "/v1/requests")})


def trace_context(header: str | None) -> str:
    """Return the ``traceparent`` to forward for this request.

    That is the gateway span's when export is on, else the request's valid
    ``traceparent``, else a new one for a request with none or a malformed one.
    """
    current = tracing.current_traceparent()
    if current is not None:
        return current
    remote = tracing.parse_traceparent(header)
    if remote is not None:
        return tracing.format_traceparent(remote)
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


class TracingMiddleware:
    """Wrap the traced routes in a SERVER span while trace export is on (a plain ASGI middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server_tracer = tracing.tracer()
        if (
            server_tracer is None
            or scope["type"] != "http"
            or (scope["method"], scope["path"]) not in TRACED_ROUTES
        ):
            await self.app(scope, receive, send)
            return

        method, path = scope["method"], scope["path"]
        span = server_tracer.start_span(
            f"{method} {path}",
            context=tracing.parent_context(_header(scope, b"traceparent")),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": path, "url.path": path},
            start_time=time.time_ns(),
        )
        # Until the app starts a response, an exception is what ends the request.
        status = 500

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            # The endpoints run in this task, so they see the span as the current one.
            with trace.use_span(span, end_on_exit=False, set_status_on_exception=False):
                await self.app(scope, receive, send_and_observe)
        finally:
            span.set_attribute("http.response.status_code", status)
            # A SERVER span marks only a 5xx status as an error, because a 4xx status is the client's.
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            span.end(end_time=time.time_ns())


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None
