"""HTTP bodies and status codes of the gateway, and the handlers that turn errors into them.

Every response is a v1 reply (:class:`PredictReply`) or, for an error, the v1
error object under ``error``. FastAPI's default ``{"detail": ...}`` bodies
never leave the gateway: validation errors, unknown routes and unexpected
exceptions are rewritten here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import asyncpg
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from graphinfer.errors import ERROR_CODES, ErrorDetail, GraphinferError
from graphinfer.models.manifest import FeatureSpec, InputSignature, Metric
from graphinfer.models.schema import ErrorObject

logger = logging.getLogger(__name__)

# HTTP status of each reply status; a rejected reply takes its error code's status.
STATUS_HTTP: Mapping[str, int] = {"ok": 200, "partial": 200, "failed": 502, "expired": 504, "pending": 200}
RETRY_AFTER_S = 1
_HTTP_STATUS_CODES = {
    401: "unauthorized",
    404: "not_found",
    413: "message_too_large",
    429: "too_many_requests",
}


class ErrorReply(BaseModel):
    """The body of every error response: the request id when known and the v1 error object."""

    request_id: str | None = None
    status: Literal["rejected"] = "rejected"
    error: ErrorObject


class ServedModel(BaseModel):
    """One model version loaded by at least one live worker."""

    model: str
    version: int
    task: Literal["node", "edge", "graph"]
    serving: bool = Field(description="true when requests that name the model without a version get it")
    sha256: str
    workers: int = Field(description="live workers that have this version loaded")
    input: InputSignature | None = None
    features: FeatureSpec | None = None
    metrics: dict[str, Metric] = Field(default_factory=dict, description="held-out metrics from the manifest")


class ModelList(BaseModel):
    models: list[ServedModel]


class ReadinessReport(BaseModel):
    status: Literal["ready", "not_ready"]
    reply_partition: int | None = None
    problems: dict[str, str] = Field(default_factory=dict)
    error: ErrorObject | None = None


def error_body(error: GraphinferError, request_id: str | None = None) -> dict[str, Any]:
    return {"request_id": request_id, "status": "rejected", "error": error.to_dict()}


def error_response(
    error: GraphinferError, request_id: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    all_headers = dict(headers or {})
    if error.code == "unauthorized":
        all_headers.setdefault("WWW-Authenticate", "Bearer")
    if error.code in ("too_many_requests", "unavailable"):
        all_headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return JSONResponse(
        error_body(error, request_id or getattr(error, "request_id", None)),
        status_code=error.http_status,
        headers=all_headers,
    )


def reply_status(reply: Mapping[str, Any]) -> int:
    """Return the HTTP status of a v1 reply: its status's code, or for a rejection its error's."""
    status = reply.get("status")
    if status == "rejected":
        code = (reply.get("error") or {}).get("code", "invalid_request")
        return ERROR_CODES.get(code, 422)
    return STATUS_HTTP.get(str(status), 200)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers that return every error as the v1 error object."""

    @app.exception_handler(GraphinferError)
    async def _graphinfer_error(request: Request, exc: GraphinferError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        details = [
            ErrorDetail(
                ".".join(str(part) for part in error.get("loc", ())), error.get("input"), error.get("msg")
            )
            for error in errors[:20]
        ]
        first = details[0] if details else ErrorDetail("request")
        message = f"{first.field}: {first.limit} (got {first.value!r})"
        return error_response(GraphinferError(message, code="invalid_request", details=details))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_STATUS_CODES.get(exc.status_code, "invalid_request")
        if exc.status_code == 404:
            message = f"no endpoint at {request.url.path}; see /docs for the endpoints"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs for the methods"
        else:
            message = str(exc.detail)
        body = error_body(GraphinferError(message, code=code))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(asyncpg.PostgresError)
    @app.exception_handler(asyncpg.InterfaceError)
    @app.exception_handler(OSError)
    async def _database_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("database error path=%s error=%r", request.url.path, exc)
        return error_response(GraphinferError("the database request failed; retry later", code="unavailable"))

    @app.exception_handler(KafkaError)
    async def _broker_error(request: Request, exc: KafkaError) -> JSONResponse:
        logger.error("broker error path=%s error=%r", request.url.path, exc)
        return error_response(GraphinferError("the broker request failed; retry later", code="unavailable"))

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error path=%s", request.url.path)
        return error_response(
            GraphinferError("the gateway failed this request unexpectedly", code="internal")
        )
