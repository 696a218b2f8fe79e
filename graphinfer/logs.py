"""Logging set-up for graphinfer's commands: readable text or JSON lines.

Library modules only call ``logging.getLogger(__name__)``; the CLI calls
:func:`configure_logging` once. Identifiers of the work in progress
(``request_id``, ``model``, ``partition``) are set with :func:`log_context`
and added to every record by a filter, and the values of configured
secrets are masked in every line.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
}
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "graphinfer_log_context", default=MappingProxyType({})
)
MASK = "***"


@contextlib.contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Attach identifiers to every log record emitted inside the block."""
    token = _context.set(
        {**_context.get(), **{key: value for key, value in values.items() if value is not None}}
    )
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the identifiers set by :func:`log_context` onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class SecretFilter(logging.Filter):
    """Replaces the values of configured secrets in messages and arguments."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({secret for secret in secrets if len(secret) >= 4}, key=len, reverse=True)

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = self._mask(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._mask(record.exc_text)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        return True


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` with the context identifiers appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = [f"{key}={value}" for key, value in _extra_fields(record).items() if f"{key}=" not in text]
        return f"{text} {' '.join(extra)}" if extra else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line, built by the json encoder."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update(_extra_fields(record))
        if record.exc_info or record.exc_text:
            document["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(document, default=str, ensure_ascii=False)


# uvicorn adds the message again with terminal colour codes as color_message.
_NOT_FIELDS = frozenset({"exc_text", "color_message"})


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRIBUTES and not key.startswith("_") and key not in _NOT_FIELDS
    }


def configure_logging(level: str = "INFO", log_format: str = "text", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level_number = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(level_number, int):
        level_number = logging.INFO
    root.setLevel(level_number)
    # Faust and aiokafka log every rebalance step at info; keep their warnings.
    for noisy in ("faust", "mode", "aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level_number))
