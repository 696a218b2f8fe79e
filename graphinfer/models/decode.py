"""Turn raw request bytes into a validated :class:`PredictRequest`.

The worker consumes raw bytes and validates them here, so a bad message
becomes a ``rejected`` reply and a dead letter instead of a crashed agent.
JSON is parsed strictly: duplicate keys and the ``NaN`` and ``Infinity``
literals that Python's ``json`` accepts by default are rejected.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from graphinfer.errors import ErrorDetail, RequestRejected
from graphinfer.models.graph import GraphInput, build_graph, check_targets
from graphinfer.models.schema import REQUEST_ID_PATTERN, SCHEMA_MAJOR_VERSION, TASKS, PredictRequest

SCHEMA_HEADER = "graphinfer-schema"
_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)


@dataclass(frozen=True)
class Limits:
    """Caps on one request; each names the setting that raises it."""

    max_message_bytes: int = 1_000_000
    max_nodes: int = 20_000
    max_edges: int = 100_000
    max_targets: int = 20_000


@dataclass(frozen=True)
class DecodedRequest:
    request: PredictRequest
    graph: GraphInput


def request_hash(decoded: DecodedRequest) -> str:
    """Hash the canonical graph, task, models and targets of a request (sha256 hex)."""
    canonical = decoded.request.model_dump(mode="json", include={"graph", "task", "models", "targets"})
    # An absent edge list, an empty one and one sent as "links" mean the same graph.
    graph = canonical["graph"]
    graph["edges"] = graph.pop("links", None) or graph.get("edges") or []
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _DuplicateKey(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"the literal {name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """Parse UTF-8 JSON strictly; raise :class:`RequestRejected` naming what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestRejected(
            f"the message is not UTF-8: byte {raw[exc.start : exc.start + 1]!r} at position {exc.start}; "
            "send the request as UTF-8 JSON",
            code="invalid_encoding",
            details=[ErrorDetail("body", f"byte {exc.start}", "UTF-8")],
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise RequestRejected(
            f"the key {exc.args[0]!r} appears twice in one JSON object; send each key once",
            code="invalid_json",
            details=[ErrorDetail(str(exc.args[0]), None, "unique keys")],
        ) from None
    except json.JSONDecodeError as exc:
        raise RequestRejected(
            f"the message is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
            "send one JSON object (RFC 8259) encoded as UTF-8",
            code="invalid_json",
            details=[ErrorDetail("body", f"line {exc.lineno} column {exc.colno}", "JSON (RFC 8259)")],
        ) from None
    except ValueError as exc:
        raise RequestRejected(
            f"the message is not valid JSON: {exc}; send finite numbers only",
            code="invalid_json",
            details=[ErrorDetail("body", str(exc), "JSON (RFC 8259)")],
        ) from None


def recover_request_id(document: Any) -> str | None:
    """Return the request's id when the document carries a well-formed one."""
    if isinstance(document, Mapping):
        request_id = document.get("request_id")
        if isinstance(request_id, str) and _REQUEST_ID_RE.match(request_id):
            return request_id
    return None


def check_no_nul(document: Any, path: str = "") -> None:
    """Reject a NUL character (U+0000) in any key or string: PostgreSQL cannot store it in text or jsonb."""
    if isinstance(document, str):
        strings: list[tuple[str, str]] = [(path or "body", document)]
        children: list[tuple[str, Any]] = []
    elif isinstance(document, dict):
        strings = [(f"{path}.{key}" if path else key, key) for key in document]
        children = [(f"{path}.{key}" if path else key, value) for key, value in document.items()]
    elif isinstance(document, list):
        strings = []
        children = [(f"{path}[{index}]", value) for index, value in enumerate(document)]
    else:
        return
    for location, text in strings:
        if "\x00" in text:
            shown = location.replace("\x00", "\\u0000")
            raise RequestRejected(
                f"{shown} contains the NUL character (U+0000), which graphinfer cannot store; "
                "remove it from the request",
                code="invalid_request",
                details=[ErrorDetail(shown, None, "text without U+0000")],
            )
    for location, child in children:
        check_no_nul(child, location)


def check_schema_header(headers: Mapping[str, bytes]) -> None:
    raw = headers.get(SCHEMA_HEADER)
    if raw is None:
        return
    text = raw.decode("utf-8", errors="replace").strip()
    major = text.split(".", 1)[0]
    if major != str(SCHEMA_MAJOR_VERSION):
        raise RequestRejected(
            f"header {SCHEMA_HEADER} is {text!r}, but this service reads schema version "
            f"{SCHEMA_MAJOR_VERSION}; send version {SCHEMA_MAJOR_VERSION} requests or omit the header",
            code="unsupported_schema",
            details=[ErrorDetail(SCHEMA_HEADER, text, str(SCHEMA_MAJOR_VERSION))],
        )


def check_size(raw: bytes, limits: Limits) -> None:
    if len(raw) > limits.max_message_bytes:
        raise RequestRejected(
            f"the message is {len(raw):,} bytes, over the limit of {limits.max_message_bytes:,} "
            "(GRAPHINFER_MAX_MESSAGE_BYTES); send a smaller graph or raise the limit",
            code="message_too_large",
            details=[ErrorDetail("body", len(raw), limits.max_message_bytes)],
        )


def validate_document(document: Any, limits: Limits) -> DecodedRequest:
    """Validate a parsed JSON document and build its graph."""
    if not isinstance(document, dict):
        raise RequestRejected(
            f"the message is a JSON {type(document).__name__}, not an object; send a v1 request object",
            code="invalid_request",
            details=[ErrorDetail("body", type(document).__name__, "object")],
        )
    _check_counts(document, limits)
    try:
        request = PredictRequest.model_validate(document)
    except ValidationError as exc:
        raise _rejection_from(exc) from None

    if request.task is not None and request.task not in TASKS:
        raise RequestRejected(
            f"task {request.task!r} is not one of {', '.join(TASKS)}; set task to one of them or omit it",
            code="unknown_task",
            details=[ErrorDetail("task", request.task, list(TASKS))],
        )
    graph = build_graph(request.graph)
    check_targets(graph, request.targets)
    return DecodedRequest(request=request, graph=graph)


def decode_request(
    raw: bytes | None,
    limits: Limits,
    *,
    key: bytes | None = None,
    headers: Mapping[str, bytes] | None = None,
    require_id: bool = True,
) -> DecodedRequest:
    """Decode one Kafka message value into a validated request.

    Raises :class:`RequestRejected`; its ``request_id`` attribute contains the id
    when one could be recovered from the message, so a reply can be sent.
    """
    request_id: str | None = None
    try:
        if raw is None:
            raise RequestRejected(
                "the message has no value (a tombstone); send a v1 request as the value",
                code="invalid_request",
                details=[ErrorDetail("value", None, "a v1 request")],
            )
        check_size(raw, limits)
        document = parse_json(raw)
        request_id = recover_request_id(document)
        # JSON can carry NUL only as the escape \u0000, so the walk runs only when that occurs.
        if b"\\u0000" in raw:
            check_no_nul(document)
        check_schema_header(headers or {})
        decoded = validate_document(document, limits)
        _check_id_and_key(decoded.request.request_id, key, require_id)
        return decoded
    except RequestRejected as exc:
        exc.request_id = request_id  # type: ignore[attr-defined]
        raise


def _check_id_and_key(request_id: str | None, key: bytes | None, require_id: bool) -> None:
    if request_id is None:
        if require_id:
            raise RequestRejected(
                "request_id is missing; every request on Kafka needs a request_id of 1-128 characters "
                "from [A-Za-z0-9._:-], also used as the message key",
                code="invalid_request",
                details=[ErrorDetail("request_id", None, REQUEST_ID_PATTERN)],
            )
        return
    if key is not None and key.decode("utf-8", errors="replace") != request_id:
        shown = key.decode("utf-8", errors="replace")
        raise RequestRejected(
            f"the message key {shown[:128]!r} differs from request_id {request_id!r}; "
            "key the message by its request_id or send it without a key",
            code="invalid_request",
            details=[ErrorDetail("key", shown[:128], request_id)],
        )


def _check_counts(document: dict[str, Any], limits: Limits) -> None:
    graph = document.get("graph")
    if not isinstance(graph, dict):
        return
    nodes = graph.get("nodes")
    if isinstance(nodes, list) and len(nodes) > limits.max_nodes:
        raise RequestRejected(
            f"graph.nodes has {len(nodes):,} nodes, over the limit of {limits.max_nodes:,} "
            "(GRAPHINFER_MAX_NODES); send a smaller graph or raise the limit",
            code="graph_too_large",
            details=[ErrorDetail("graph.nodes", len(nodes), limits.max_nodes)],
        )
    for name in ("edges", "links"):
        edges = graph.get(name)
        if isinstance(edges, list) and len(edges) > limits.max_edges:
            raise RequestRejected(
                f"graph.{name} has {len(edges):,} edges, over the limit of {limits.max_edges:,} "
                "(GRAPHINFER_MAX_EDGES); send a smaller graph or raise the limit",
                code="graph_too_large",
                details=[ErrorDetail(f"graph.{name}", len(edges), limits.max_edges)],
            )
    targets = document.get("targets")
    if isinstance(targets, dict):
        count = sum(len(value) for value in targets.values() if isinstance(value, list))
        if count > limits.max_targets:
            raise RequestRejected(
                f"targets lists {count:,} nodes and edges, over the limit of {limits.max_targets:,} "
                "(GRAPHINFER_MAX_TARGETS); split the request or raise the limit",
                code="invalid_targets",
                details=[ErrorDetail("targets", count, limits.max_targets)],
            )


def _rejection_from(exc: ValidationError) -> RequestRejected:
    # A failed union reports one error per member; the custom checks
    # (value_error) explain the input better than "not a list".
    errors = sorted(exc.errors(include_url=False), key=lambda error: error["type"] != "value_error")
    first = errors[0]
    location = _location(first["loc"])
    top = str(first["loc"][0]) if first["loc"] else ""
    code = {"graph": "invalid_graph", "targets": "invalid_targets", "task": "unknown_task"}.get(
        top, "invalid_request"
    )
    same_place = [error for error in errors if _location(error["loc"]) == location]
    if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
        message = f"unknown field {location!r}; remove it (v1 requests allow only the documented fields)"
    elif location == "request_id" and first["type"] == "string_pattern_mismatch":
        value = first.get("input")
        bad = sorted({char for char in str(value) if not re.match(r"[A-Za-z0-9._:-]", char)})
        problem = (
            f"contains {', '.join(repr(char) for char in bad)}"
            if bad
            else f"has {len(str(value))} characters"
        )
        message = f"request_id {value!r} {problem}; use 1-128 characters from letters, digits and . _ : -"
    elif first["type"] == "model_type":
        expected = "an object"
        message = f"{location or 'request'} is a JSON {_json_type(first.get('input'))}; send {expected}"
    elif _is_node_id(location) and {error["type"] for error in same_place} <= _ID_TYPE_ERRORS:
        message = (
            f"{location} is {first.get('input')!r}; node ids must be strings or integers "
            "(not booleans, floats or null)"
        )
        first = {**first, "msg": "a string or an integer"}
        errors = [first] + [error for error in errors if _location(error["loc"]) != location]
    else:
        message = f"{location or 'request'}: {first['msg'].removeprefix('Value error, ')}"
        value = first.get("input")
        if first["type"] != "value_error" and not isinstance(value, dict | list):
            message += f" (got {value!r})"
    if len(errors) > 1:
        message += f"; {len(errors) - 1} more problem(s) listed in details"
    details = [
        ErrorDetail(_location(error["loc"]), _short(error.get("input")), _limit_text(error))
        for error in errors[:20]
    ]
    return RequestRejected(message, code=code, details=details)


_ID_TYPE_ERRORS = {"int_type", "string_type"}


def _is_node_id(location: str) -> bool:
    return location.endswith((".id", ".source", ".target")) or location.startswith("targets.nodes[")


def _location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("int", "str", "float", "list[union[int,float]]", "SparseFeatures") or "[" in str(item):
            # pydantic adds the union member it tried; callers care about the field.
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _limit_text(error: Any) -> str:
    if error["type"] == "model_type":
        return "an object"
    if error["type"] == "string_pattern_mismatch" and _location(error["loc"]) == "request_id":
        return "1-128 characters from [A-Za-z0-9._:-]"
    return str(error["msg"]).removeprefix("Value error, ")


def _json_type(value: Any) -> str:
    names = {
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _short(value: Any) -> Any:
    if isinstance(value, dict | list):
        return f"<{type(value).__name__} of {len(value)}>"
    return value
