"""The root error of graphinfer and the closed set of v1 error codes.

Every error that reaches a client, over Kafka or HTTP, is a
:class:`GraphinferError`. The worker turns it into the ``error`` object of a
v1 reply and the gateway into an HTTP response with :attr:`http_status`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: The closed set of v1 error codes with the HTTP status each maps to.
ERROR_CODES: Mapping[str, int] = {
    "invalid_encoding": 400,
    "invalid_json": 400,
    "invalid_request": 422,
    "invalid_graph": 422,
    "graph_too_large": 422,
    "message_too_large": 413,
    "unknown_model": 422,
    "unknown_task": 422,
    "invalid_targets": 422,
    "request_id_conflict": 409,
    "unsupported_schema": 422,
    "no_model_selected": 422,
    "incompatible_input": 422,
    "expired": 504,
    "model_failed": 502,
    "model_timeout": 502,
    "model_out_of_memory": 502,
    "internal": 500,
    # Returned by the HTTP gateway only, never in a reply on Kafka.
    "unauthorized": 401,
    "not_found": 404,
    "too_many_requests": 429,
    "unavailable": 503,
    "reply_timeout": 504,
}

_MAX_VALUE_CHARS = 200


@dataclass(frozen=True)
class ErrorDetail:
    """One offending field: its path, the value received and the limit it broke."""

    field: str
    value: Any = None
    limit: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": _json_safe(self.value), "limit": _json_safe(self.limit)}


class GraphinferError(Exception):
    """Base class of every error graphinfer reports to a client.

    ``code`` is one of :data:`ERROR_CODES`; the message names the value, the
    limit and what to change.
    """

    code: str = "internal"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Iterable[ErrorDetail] = (),
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if self.code not in ERROR_CODES:
            raise ValueError(f"unknown error code {self.code!r}")
        self.message = message
        self.details = tuple(details)

    @property
    def http_status(self) -> int:
        return ERROR_CODES[self.code]

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "details": [detail.to_dict() for detail in self.details],
        }


class RequestRejected(GraphinferError):
    """The request itself is invalid: retrying it unchanged fails again."""

    code = "invalid_request"


class ModelError(GraphinferError):
    """One model failed on one request; the other models' results stand."""

    code = "model_failed"


class ConfigurationError(Exception):
    """A setting or an external service the process needs is wrong or unreachable.

    Raised at start-up; the message names the setting and the expected form.
    The operator fixes the setting (or starts the service) and restarts.
    """


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, str):
            # PostgreSQL cannot store U+0000 in text or jsonb, where replies end up.
            value = value.replace("\x00", "\\u0000")
            if len(value) > _MAX_VALUE_CHARS:
                return value[:_MAX_VALUE_CHARS] + "..."
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + "..."
