"""The HTTP gateway: HTTP requests in, messages on the request topic out.

The gateway never runs models. It validates a request, stores it as
``pending`` with its request hash, publishes it keyed by its ``request_id``
and reads the outcome the worker stores in PostgreSQL, so HTTP and Kafka
callers get the same answers and the same rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from graphinfer.errors import ERROR_CODES, ErrorDetail, GraphinferError, RequestRejected
from graphinfer.models.decode import Limits, check_size, parse_json, request_hash, validate_document
from graphinfer.settings import Settings
from graphinfer.storage.db import Database

logger = logging.getLogger(__name__)

STATUS_HTTP = {"ok": 200, "partial": 200, "failed": 502, "expired": 504, "pending": 200}
_POLL_MAX_INTERVAL_S = 0.1


def _error_response(error: GraphinferError, request_id: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"request_id": request_id, "status": "rejected", "error": error.to_dict()}
    return JSONResponse(body, status_code=error.http_status)


def _reply_response(reply: dict[str, Any]) -> JSONResponse:
    status = reply["status"]
    if status == "rejected":
        code = (reply.get("error") or {}).get("code", "invalid_request")
        http_status = ERROR_CODES.get(code, 422)
    else:
        http_status = STATUS_HTTP.get(status, 200)
    return JSONResponse(reply, status_code=http_status)


class Gateway:
    """Holds the gateway's producer and database pool for the app's lifetime."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = Limits(
            max_message_bytes=settings.max_message_bytes,
            max_nodes=settings.max_nodes,
            max_edges=settings.max_edges,
            max_targets=settings.max_targets,
        )
        self.database: Database | None = None
        self.producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self.database = await Database.connect(
            self.settings.dsn, timeout_s=self.settings.database_connect_timeout_s
        )
        self.producer = AIOKafkaProducer(
            **self.settings.kafka_client_options(),
            client_id=f"{self.settings.app_id}-gateway",
            max_request_size=self.settings.max_message_bytes + 65_536,
        )
        await self.producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
        if self.database is not None:
            await self.database.close()

    async def read_body(self, request: Request) -> bytes:
        """Read the body, stopping at the size limit even without a Content-Length."""
        limit = self.limits.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            check_size(b"\0" * (limit + 1), self.limits)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestRejected(
                    f"the body is over {limit:,} bytes (GRAPHINFER_MAX_MESSAGE_BYTES); send a smaller graph",
                    code="message_too_large",
                    details=[ErrorDetail("body", f"more than {limit}", limit)],
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def submit(self, raw: bytes) -> tuple[str, dict[str, Any] | None]:
        """Validate, store as pending and publish; return the id and a stored reply if it already exists."""
        assert self.database is not None and self.producer is not None
        document = parse_json(raw)
        if isinstance(document, dict) and document.get("request_id") is None:
            document["request_id"] = uuid.uuid4().hex
        decoded = validate_document(document, self.limits)
        request_id = decoded.request.request_id
        assert request_id is not None
        digest = request_hash(decoded)

        stored = (await self.database.fetch_requests([request_id])).get(request_id)
        if stored is not None:
            if stored.request_hash != digest:
                raise GraphinferError(
                    f"request_id {request_id!r} was already used for a different request; send a new request_id",
                    code="request_id_conflict",
                    details=[ErrorDetail("request_id", request_id, "unused, or the same request")],
                )
            if stored.status != "pending":
                return request_id, stored.reply
            return request_id, None

        await self.database.pool.execute(
            """
            INSERT INTO inference_requests
                (request_id, request_hash, status, source, task, metadata, received_at)
            VALUES ($1, $2, 'pending', 'online', $3, $4, $5)
            ON CONFLICT (request_id) DO NOTHING
            """,
            request_id,
            digest,
            decoded.request.task,
            dict(decoded.request.metadata),
            datetime.now(UTC),
        )
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        await self.producer.send_and_wait(
            self.settings.request_topic, body, key=request_id.encode(), headers=[("graphinfer-schema", b"1")]
        )
        return request_id, None

    async def stored_reply(self, request_id: str) -> tuple[str, dict[str, Any] | None] | None:
        assert self.database is not None
        row = await self.database.pool.fetchrow(
            "SELECT status, reply FROM inference_requests WHERE request_id = $1", request_id
        )
        return None if row is None else (row["status"], row["reply"])

    async def wait_for_reply(self, request_id: str, timeout_s: float) -> dict[str, Any] | None:
        # NOTE: this polls PostgreSQL with a growing interval (capped at 100 ms);
        # it is correct with any number of replicas but adds up to one interval
        # of latency. Reading replies from a leased graph-replies partition
        # removes the polling.
        deadline = time.monotonic() + timeout_s
        interval = 0.005
        while time.monotonic() < deadline:
            found = await self.stored_reply(request_id)
            if found is not None and found[0] != "pending":
                return found[1]
            await asyncio.sleep(interval)
            interval = min(interval * 2, _POLL_MAX_INTERVAL_S)
        return None


def create_app(settings: Settings) -> FastAPI:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        logger.info("gateway ready request_topic=%s", settings.request_topic)
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="graphinfer", version="1", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(GraphinferError)
    async def _graphinfer_error(request: Request, exc: GraphinferError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(asyncpg.PostgresError)
    async def _database_error(request: Request, exc: asyncpg.PostgresError) -> JSONResponse:
        logger.exception("database error path=%s", request.url.path)
        return _error_response(
            GraphinferError("the database failed this request; retry later", code="internal")
        )

    @app.exception_handler(KafkaError)
    async def _kafka_error(request: Request, exc: KafkaError) -> JSONResponse:
        logger.exception("broker error path=%s", request.url.path)
        return _error_response(
            GraphinferError("the broker failed this request; retry later", code="internal")
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        problems = []
        try:
            assert gateway.database is not None
            await gateway.database.pool.fetchval("SELECT 1")
        except (AssertionError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            problems.append(f"database: {exc!r}")
        if gateway.producer is None:
            problems.append("broker: producer not started")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.post("/v1/requests", status_code=202)
    async def submit_request(request: Request) -> Response:
        raw = await gateway.read_body(request)
        request_id, reply = await gateway.submit(raw)
        location = f"/v1/requests/{request_id}"
        body = {"request_id": request_id, "status": reply["status"] if reply else "pending"}
        return JSONResponse(body, status_code=202, headers={"Location": location})

    @app.get("/v1/requests/{request_id}")
    async def get_request(request_id: str) -> Response:
        found = await gateway.stored_reply(request_id)
        if found is None:
            error = GraphinferError(
                f"no request with request_id {request_id!r} was received; check the id",
                code="invalid_request",
                details=[ErrorDetail("request_id", request_id, "an id that was sent")],
            )
            return JSONResponse(
                {"request_id": request_id, "status": "rejected", "error": error.to_dict()}, status_code=404
            )
        status, reply = found
        if status == "pending" or reply is None:
            return JSONResponse({"request_id": request_id, "status": "pending"}, status_code=200)
        return JSONResponse(reply, status_code=200)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        raw = await gateway.read_body(request)
        request_id, reply = await gateway.submit(raw)
        if reply is None:
            reply = await gateway.wait_for_reply(request_id, settings.gateway_timeout_s)
        if reply is None:
            return JSONResponse(
                {
                    "request_id": request_id,
                    "status": "pending",
                    "error": {
                        "code": "expired",
                        "message": f"no reply within {settings.gateway_timeout_s} s (GRAPHINFER_GATEWAY_TIMEOUT_S); "
                        f"the request is kept, so poll GET /v1/requests/{request_id}",
                        "details": [],
                    },
                },
                status_code=504,
            )
        return _reply_response(reply)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        assert gateway.database is not None
        rows = await gateway.database.pool.fetch(
            """
            SELECT DISTINCT ON (model, version) model, version, task, sha256, manifest, serving
            FROM model_deployments
            WHERE heartbeat_at > now() - interval '10 minutes'
            ORDER BY model, version, heartbeat_at DESC
            """
        )
        models = [
            {
                "model": row["model"],
                "version": row["version"],
                "task": row["task"],
                "serving": row["serving"],
                "input": row["manifest"].get("input"),
                "features": row["manifest"].get("features"),
                "metrics": row["manifest"].get("metrics"),
            }
            for row in rows
        ]
        return JSONResponse({"models": models})

    return app


async def preflight(settings: Settings) -> None:
    """Fail fast, naming the setting, when the broker or the database does not answer."""
    from graphinfer.broker import connect_admin

    admin = await connect_admin(settings)
    await admin.close()
    database = await Database.connect(settings.dsn, min_size=0, max_size=1)
    await database.close()


def run_gateway(settings: Settings) -> None:
    import uvicorn

    settings.bootstrap_servers  # noqa: B018 - raises ConfigurationError when unset
    settings.dsn  # noqa: B018
    asyncio.run(preflight(settings))
    uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port, log_config=None)
