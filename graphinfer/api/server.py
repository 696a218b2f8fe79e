"""The gateway's HTTP API: FastAPI routes over :class:`~graphinfer.api.gateway.Gateway`.

``/v1`` endpoints need ``Authorization: Bearer KEY`` when
``GRAPHINFER_API_KEYS`` is set; ``/healthz``, ``/readyz``, ``/metrics`` and
the OpenAPI documents stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from graphinfer import tracing
from graphinfer.api.auth import ApiKeys
from graphinfer.api.gateway import ClientDisconnected, Gateway
from graphinfer.api.metrics import CONTENT_TYPE_LATEST, GatewayMetrics, MetricsMiddleware
from graphinfer.api.responses import (
    ErrorReply,
    ModelList,
    ReadinessReport,
    ServedModel,
    error_body,
    install_error_handlers,
    reply_status,
)
from graphinfer.api.tracing import TracingMiddleware, trace_context
from graphinfer.errors import ErrorDetail, GraphinferError
from graphinfer.models.schema import PredictReply, PredictRequest
from graphinfer.settings import Settings
from graphinfer.storage import requests as stored_requests

logger = logging.getLogger(__name__)

# A status that no client reads: the client closed the connection first.
CLIENT_CLOSED_REQUEST = 499
_GRACEFUL_SHUTDOWN_S = 10

_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorReply, "description": description}
    for status, description in {
        400: "invalid_encoding or invalid_json",
        401: "unauthorized: missing or unknown API key",
        409: "request_id_conflict: the id was used for another request",
        413: "message_too_large: the body is over GRAPHINFER_MAX_MESSAGE_BYTES",
        422: "the request is invalid; error.details names the field and the limit",
        429: "too_many_requests: over GRAPHINFER_GATEWAY_MAX_IN_FLIGHT; see Retry-After",
        503: "unavailable: the broker or database does not answer, or no reply partition is leased",
    }.items()
}

_bearer = HTTPBearer(auto_error=False, description="A key from GRAPHINFER_API_KEYS")


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str | None:
    """Return the caller's tenant, None when the gateway runs open; raise ``unauthorized`` otherwise."""
    keys: ApiKeys = request.app.state.api_keys
    return keys.authenticate(credentials.credentials if credentials is not None else None)


Tenant = Annotated[str | None, Depends(authenticate)]


def create_app(settings: Settings) -> FastAPI:
    """Build the gateway app; connections open in the background when it starts."""
    metrics = GatewayMetrics()
    gateway = Gateway(settings, metrics)
    keys = ApiKeys(settings.api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not keys.enabled:
            logger.warning(
                "GRAPHINFER_API_KEYS is empty: the gateway accepts requests without an API key; "
                "set tenant=key pairs to require one"
            )
        tracing.configure("graphinfer-gateway")
        await gateway.start()
        logger.info(
            "gateway started request_topic=%s reply_topic=%s", settings.request_topic, settings.reply_topic
        )
        try:
            yield
        finally:
            await gateway.stop()
            # Off the event loop: the last export may wait for the collector up to its timeout.
            await asyncio.to_thread(tracing.shutdown)

    app = FastAPI(
        title="graphinfer gateway",
        version="1",
        summary="Graph inference over HTTP; every request goes through Kafka and the workers.",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry support is off, because graphinfer.tracing installs the
        # provider and TracingMiddleware makes the one SERVER span of each traced route.
        # FastAPI's spans would add a second SERVER span per request and trace /healthz too.
        telemetry={
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        },
    )
    app.state.gateway = gateway
    app.state.api_keys = keys
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    # Added last, so it is the outer one and its span covers the metrics middleware too.
    app.add_middleware(TracingMiddleware)

    v1 = APIRouter(prefix="/v1", responses={401: _ERRORS[401]})

    @v1.post(
        "/predict",
        response_model=PredictReply,
        responses={**_ERRORS, 502: {"model": PredictReply}, 504: {"model": PredictReply}},
        openapi_extra=_REQUEST_BODY,
        summary="Run a request and wait for its reply",
    )
    async def predict(
        request: Request,
        tenant: Tenant,
        timeout_s: Annotated[
            float | None,
            Query(gt=0, description="Seconds to wait for the reply (default GRAPHINFER_GATEWAY_TIMEOUT_S)"),
        ] = None,
    ) -> Response:
        wait_s = _reply_timeout(settings, timeout_s)
        async with gateway.admit():
            gateway.check_ready()
            raw = await read_body(request, settings.max_message_bytes)
            traceparent = trace_context(request.headers.get("traceparent"))
            submission = await gateway.submit(raw, tenant, wait=True, traceparent=traceparent)
            trace_header = {"traceparent": traceparent}
            if submission.reply is not None:
                metrics.waits.labels("stored").inc()
                return JSONResponse(
                    submission.reply, status_code=reply_status(submission.reply), headers=trace_header
                )
            try:
                reply = await gateway.wait_for_reply(submission, wait_s, request.receive)
            except ClientDisconnected:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
        if reply is None:
            response = _timeout_response(submission.request_id, wait_s)
            response.headers["traceparent"] = traceparent
            return response
        return JSONResponse(reply, status_code=reply_status(reply), headers=trace_header)

    @v1.post(
        "/requests",
        status_code=202,
        response_model=PredictReply,
        responses=_ERRORS,
        openapi_extra=_REQUEST_BODY,
        summary="Accept a request; poll its Location for the reply",
    )
    async def submit_request(request: Request, tenant: Tenant) -> Response:
        async with gateway.admit():
            gateway.check_ready()
            raw = await read_body(request, settings.max_message_bytes)
            traceparent = trace_context(request.headers.get("traceparent"))
            submission = await gateway.submit(raw, tenant, wait=False, traceparent=traceparent)
        body = submission.reply or pending_reply(submission.request_id)
        location = f"/v1/requests/{submission.request_id}"
        return JSONResponse(body, status_code=202, headers={"Location": location, "traceparent": traceparent})

    @v1.get(
        "/requests/{request_id}",
        response_model=PredictReply,
        responses={404: {"model": ErrorReply}, 503: _ERRORS[503]},
        summary="The stored reply of a request, or status pending",
    )
    async def get_request(request_id: str, tenant: Tenant) -> Response:
        database, _ = gateway.connections()
        state = await stored_requests.fetch_state(database, request_id)
        if state is None or (keys.enabled and state.tenant != tenant):
            raise GraphinferError(
                f"no request with request_id {request_id!r} was received from this API key; check the id",
                code="not_found",
                details=[ErrorDetail("request_id", request_id, "an id this API key sent")],
            )
        if state.status == "pending" or state.reply is None:
            return JSONResponse(
                pending_reply(
                    request_id,
                    source=state.source,
                    metadata=state.metadata,
                    received_at=state.received_at.isoformat(),
                )
            )
        return JSONResponse(state.reply)

    @v1.get(
        "/models", response_model=ModelList, responses={503: _ERRORS[503]}, summary="Models of live workers"
    )
    async def list_models(tenant: Tenant) -> ModelList:
        models = [
            ServedModel(
                model=deployment.model,
                version=deployment.version,
                task=deployment.task,  # type: ignore[arg-type]
                serving=deployment.serving,
                sha256=deployment.sha256,
                workers=deployment.workers,
                input=deployment.manifest.get("input"),
                features=deployment.manifest.get("features"),
                metrics=deployment.manifest.get("metrics") or {},
            )
            for deployment in await gateway.deployments()
        ]
        return ModelList(models=models)

    app.include_router(v1)

    @app.get("/healthz", summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadinessReport, responses={503: {"model": ReadinessReport}})
    async def readyz() -> JSONResponse:
        problems = await gateway.readiness()
        report: dict[str, Any] = {
            "status": "not_ready" if problems else "ready",
            "reply_partition": gateway.router.partition if gateway.lease.partition is not None else None,
            "problems": problems,
        }
        if problems:
            reasons = "; ".join(f"{name}: {problem}" for name, problem in sorted(problems.items()))
            error = GraphinferError(f"not ready: {reasons}", code="unavailable")
            report["error"] = error_body(error)["error"]
            return JSONResponse(report, status_code=503)
        return JSONResponse(report)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def pending_reply(
    request_id: str,
    *,
    source: str = "online",
    metadata: dict[str, str] | None = None,
    received_at: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the v1 reply of a request that the worker has not finished yet."""
    return {
        "request_id": request_id,
        "status": "pending",
        "source": source,
        "replay_run_id": None,
        "metadata": metadata or {},
        "results": [],
        "skipped": [],
        "error": error,
        "received_at": received_at,
        "completed_at": None,
    }


def _reply_timeout(settings: Settings, timeout_s: float | None) -> float:
    if timeout_s is None:
        return settings.gateway_timeout_s
    if timeout_s > settings.gateway_max_timeout_s:
        raise GraphinferError(
            f"timeout_s {timeout_s:g} is over the limit of {settings.gateway_max_timeout_s:g} s "
            "(GRAPHINFER_GATEWAY_MAX_TIMEOUT_S); ask for a shorter wait or poll GET /v1/requests/{request_id}",
            code="invalid_request",
            details=[ErrorDetail("timeout_s", timeout_s, settings.gateway_max_timeout_s)],
        )
    return timeout_s


def _timeout_response(request_id: str, timeout_s: float) -> JSONResponse:
    location = f"/v1/requests/{request_id}"
    error = GraphinferError(
        f"no reply within {timeout_s:g} s (timeout_s or GRAPHINFER_GATEWAY_TIMEOUT_S); the request is "
        f"kept and its result will be stored, so poll GET {location}",
        code="reply_timeout",
        details=[ErrorDetail("timeout_s", timeout_s, timeout_s)],
    )
    body = pending_reply(request_id, error=error.to_dict())
    return JSONResponse(body, status_code=error.http_status, headers={"Location": location})


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, stopping at ``limit`` bytes even when no Content-Length was sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> GraphinferError:
    shown = f"{size:,} bytes" if size is not None else f"more than {limit:,} bytes"
    return GraphinferError(
        f"the body is {shown}, over the limit of {limit:,} (GRAPHINFER_MAX_MESSAGE_BYTES); "
        "send a smaller graph or raise the limit",
        code="message_too_large",
        details=[ErrorDetail("body", size if size is not None else f"more than {limit}", limit)],
    )


def _openapi(app: FastAPI) -> dict[str, Any]:
    # The endpoints read the body as bytes to parse it strictly (no duplicate
    # keys, no NaN). FastAPI then cannot derive its schema, so it is added here.
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    request_schema = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in request_schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components["PredictRequest"] = request_schema
    app.openapi_schema = schema
    return schema


def run_gateway(settings: Settings) -> None:
    """Serve the gateway until SIGINT or SIGTERM.

    Missing settings stop it at once; an unreachable broker or database does
    not. The gateway then serves ``/healthz`` and reports not ready on
    ``/readyz`` until both are reachable.
    """
    import uvicorn

    settings.bootstrap_servers  # noqa: B018 - raises ConfigurationError when unset
    settings.dsn  # noqa: B018
    uvicorn.run(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )
