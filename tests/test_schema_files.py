"""The JSON Schema files for Kafka producers stay in step with the pydantic models."""

from __future__ import annotations

import json

from graphinfer.models.schema import SCHEMA_DIR, json_schemas


def test_schema_files_match_models() -> None:
    for name, schema in json_schemas().items():
        path = SCHEMA_DIR / name
        assert path.is_file(), f"{path} is missing; run python -m graphinfer.models.schema"
        assert json.loads(path.read_text()) == schema, (
            f"{path} is stale; run python -m graphinfer.models.schema"
        )


def test_request_schema_forbids_unknown_fields() -> None:
    schema = json_schemas()["request.v1.json"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {
        "request_id",
        "graph",
        "task",
        "models",
        "targets",
        "metadata",
        "deadline",
    }
