"""Log output: JSON lines, context identifiers and masked secrets."""

from __future__ import annotations

import io
import json
import logging

import pytest

from graphinfer.logs import ContextFilter, JsonFormatter, SecretFilter, TextFormatter, log_context


@pytest.fixture
def capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.addFilter(SecretFilter(["s3cret-password", "key-abc123"]))
    logger = logging.getLogger(f"graphinfer.test.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_json_lines_parse(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.handlers[0].setFormatter(JsonFormatter())
    logger.info("first %s", "line")
    with log_context(request_id="r-1", partition=3):
        logger.warning('second "quoted" line\nwith a newline')
    documents = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [document["message"] for document in documents] == [
        "first line",
        'second "quoted" line\nwith a newline',
    ]
    assert documents[1]["request_id"] == "r-1"
    assert documents[1]["partition"] == 3
    assert "request_id" not in documents[0]


def test_text_format_appends_context(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.handlers[0].setFormatter(TextFormatter())
    with log_context(request_id="r-2", model="cora-sgc@1"):
        logger.info("scored")
    assert stream.getvalue().rstrip().endswith("request_id=r-2 model=cora-sgc@1")


def test_secrets_masked_in_message_and_args(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.handlers[0].setFormatter(JsonFormatter())
    logger.error("connect failed to postgresql://app:%s@db/graphs", "s3cret-password")
    logger.warning("bad key key-abc123 from tenant")
    text = stream.getvalue()
    assert "s3cret-password" not in text
    assert "key-abc123" not in text
    assert text.count("***") == 2


def test_secrets_masked_in_tracebacks(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.handlers[0].setFormatter(JsonFormatter())
    try:
        raise RuntimeError("password s3cret-password rejected")
    except RuntimeError:
        logger.exception("login failed")
    assert "s3cret-password" not in stream.getvalue()
    assert "RuntimeError" in json.loads(stream.getvalue())["exception"]
