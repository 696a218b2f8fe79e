"""Settings: GRAPHINFER_ names, the older names, .env and the start-up messages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from graphinfer.errors import ConfigurationError
from graphinfer.settings import load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GRAPHINFER_") or name in ("DB_URL", "MODEL_PATHS", "OFFLINE_TASK_SCHEDULE"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_design() -> None:
    settings = load_settings()
    assert settings.request_topic == "graph-requests"
    assert settings.replay_topic == "graph-requests.replay"
    assert settings.prediction_topic == "predictions"
    assert settings.reply_topic == "graph-replies"
    assert settings.dead_letter_topic == "graph-requests.dlq"
    assert settings.max_message_bytes == 1_000_000
    assert settings.kafka_fetch_max_wait_ms == 10


def test_sqlite_db_url_says_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_URL", "sqlite:///./test.db")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert "DB_URL" in message
    assert "PostgreSQL" in message
    assert "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE" in message


def test_legacy_names_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DB_URL", "postgresql://app@db:5432/graphs")
    monkeypatch.setenv("MODEL_PATHS", json.dumps({"cora-sgc": str(tmp_path)}))
    monkeypatch.setenv("OFFLINE_TASK_SCHEDULE", "0 0 * * *")
    settings = load_settings()
    assert settings.dsn == "postgresql://app@db:5432/graphs"
    assert settings.model_paths == {"cora-sgc": tmp_path}
    assert settings.replay_schedule == "0 0 * * *"


def test_new_name_wins_with_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DB_URL", "postgresql://old@db/old")
    monkeypatch.setenv("GRAPHINFER_DATABASE_URL", "postgresql://new@db/new")
    with caplog.at_level(logging.WARNING, logger="graphinfer.settings"):
        settings = load_settings()
    assert settings.dsn == "postgresql://new@db/new"
    assert "GRAPHINFER_DATABASE_URL" in caplog.text
    assert "DB_URL" in caplog.text


def test_dotenv_file_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GRAPHINFER_APP_ID=from-dotenv\nGRAPHINFER_MAX_NODES=123\n")
    settings = load_settings()
    assert settings.app_id == "from-dotenv"
    assert settings.max_nodes == 123


def test_wrong_integer_names_variable_and_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHINFER_MAX_NODES", "lots")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "GRAPHINFER_MAX_NODES" in str(caught.value)
    assert "'lots'" in str(caught.value)


def test_cron_with_seven_fields_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHINFER_REPLAY_SCHEDULE", "0 0 0 * * * 2026")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "GRAPHINFER_REPLAY_SCHEDULE" in str(caught.value)
    assert "five-field" in str(caught.value)


def test_cron_with_seconds_field_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHINFER_REPLAY_SCHEDULE", "*/2 * * * * *")
    assert load_settings().replay_schedule == "*/2 * * * * *"


def test_cron_out_of_range_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLINE_TASK_SCHEDULE", "61 0 * * *")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "OFFLINE_TASK_SCHEDULE" in str(caught.value)
    assert "'61 0 * * *' is not a valid cron expression" in str(caught.value)


def test_replay_dataset_and_query_conflict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHINFER_REPLAY_DATASET", "graphs.jsonl")
    monkeypatch.setenv("GRAPHINFER_REPLAY_DATASET_QUERY", "SELECT id, graph FROM graphs ORDER BY id")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "GRAPHINFER_REPLAY_DATASET and GRAPHINFER_REPLAY_DATASET_QUERY are both set" in str(caught.value)


def test_unknown_time_zone_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHINFER_REPLAY_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "GRAPHINFER_REPLAY_TIMEZONE" in str(caught.value)


def test_bootstrap_without_port_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS", "kafka-1")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS" in str(caught.value)
    assert "host:port" in str(caught.value)


def test_pairs_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHINFER_MODEL_VERSIONS", "cora-sgc=3, mutag-wl=2")
    monkeypatch.setenv("GRAPHINFER_DEFAULT_MODELS", "cora-sgc,mutag-wl@2")
    monkeypatch.setenv("GRAPHINFER_API_KEYS", "tenant-a=key-a")
    settings = load_settings()
    assert settings.model_versions == {"cora-sgc": 3, "mutag-wl": 2}
    assert settings.default_models == ("cora-sgc", "mutag-wl@2")
    assert settings.api_keys["tenant-a"].get_secret_value() == "key-a"


def test_secret_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHINFER_DATABASE_URL", "postgresql://app:s3cret-pw@db/graphs")
    monkeypatch.setenv("GRAPHINFER_KAFKA_SASL_PASSWORD", "kafka-s3cret")
    text = repr(load_settings())
    assert "s3cret-pw" not in text
    assert "kafka-s3cret" not in text


def test_missing_bootstrap_named_when_used() -> None:
    with pytest.raises(ConfigurationError) as caught:
        _ = load_settings().bootstrap_servers
    assert "GRAPHINFER_KAFKA_BOOTSTRAP_SERVERS" in str(caught.value)


def test_missing_database_named_when_used() -> None:
    with pytest.raises(ConfigurationError) as caught:
        _ = load_settings().dsn
    assert "GRAPHINFER_DATABASE_URL" in str(caught.value)
