"""graphinfer's settings: ``GRAPHINFER_*`` environment variables and ``.env``.

One class, read once at start-up. A wrong value stops the process with a
message that names the variable and the expected form. The older names
``MODEL_PATHS``, ``DB_URL`` and ``OFFLINE_TASK_SCHEDULE`` are read too; when
both an old and a new name are set, the new one wins and a warning is logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from graphinfer.errors import ConfigurationError

logger = logging.getLogger(__name__)

ENV_PREFIX = "GRAPHINFER_"
# Older deployments set these; each maps to its GRAPHINFER_ field.
LEGACY_NAMES = {
    "DB_URL": "database_url",
    "MODEL_PATHS": "model_paths",
    "OFFLINE_TASK_SCHEDULE": "replay_schedule",
}
POSTGRES_SCHEMES = ("postgresql", "postgres")
DATABASE_URL_FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"


class Settings(BaseSettings):
    """Every setting of graphinfer. Field docstrings give the unit and default."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )

    app_id: str = Field(default="graphinfer", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    """Kafka consumer group and client id prefix; separate deployments on one cluster use separate ids."""

    # --- Kafka ---------------------------------------------------------------
    kafka_bootstrap_servers: str | None = None
    """Comma-separated ``host:port`` list of the Kafka brokers. Required by worker and gateway."""
    kafka_fetch_max_wait_ms: int = Field(default=10, ge=0, le=60_000)
    """Milliseconds a fetch may wait on the broker for data (default 10)."""
    kafka_session_timeout_s: float = Field(default=10.0, gt=0, le=300)
    """Consumer group session timeout in seconds (default 10)."""
    kafka_max_poll_interval_s: float = Field(default=300.0, gt=0, le=86_400)
    """Seconds the consumer may go without polling before it leaves its group (default 300).

    While the database is unavailable the worker pauses its partitions and
    keeps polling, so an outage of any length does not count against it.
    """
    kafka_topic_check_interval_s: float = Field(default=10.0, ge=0, le=3600)
    """Seconds between checks that the broker is reachable and still has every topic (default 10).

    The consumer also refreshes its metadata every three intervals, and at
    most every 5 s, to pick up recreated topics. 0 turns both off.
    """
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Kafka security protocol (default PLAINTEXT)."""
    kafka_sasl_mechanism: str | None = None
    """SASL mechanism such as PLAIN or SCRAM-SHA-512, when the protocol uses SASL."""
    kafka_sasl_username: str | None = None
    """SASL user name."""
    kafka_sasl_password: SecretStr | None = None
    """SASL password."""
    create_topics: bool = True
    """Create missing topics at start with the configured partition counts (default true)."""
    request_topic: str = "graph-requests"
    """Topic of online requests (default ``graph-requests``)."""
    replay_topic: str = "graph-requests.replay"
    """Topic of replayed requests, read by a separate agent (default ``graph-requests.replay``)."""
    prediction_topic: str = "predictions"
    """Topic every reply is written to (default ``predictions``)."""
    reply_topic: str = "graph-replies"
    """Topic of replies routed to a gateway replica by partition (default ``graph-replies``)."""
    dead_letter_topic: str = "graph-requests.dlq"
    """Topic of rejected messages with the reason in headers (default ``graph-requests.dlq``)."""
    request_partitions: int = Field(default=4, ge=1, le=10_000)
    """Partitions of the request topic when graphinfer creates it (default 4)."""
    replay_partitions: int = Field(default=4, ge=1, le=10_000)
    """Partitions of the replay topic when graphinfer creates it (default 4)."""
    prediction_partitions: int = Field(default=4, ge=1, le=10_000)
    """Partitions of the prediction topic when graphinfer creates it (default 4)."""
    reply_partitions: int = Field(default=4, ge=1, le=10_000)
    """Partitions of the reply topic: the most gateway replicas that can wait for replies (default 4)."""
    dead_letter_partitions: int = Field(default=1, ge=1, le=10_000)
    """Partitions of the dead-letter topic when graphinfer creates it (default 1)."""
    topic_replication_factor: int = Field(default=1, ge=1, le=16)
    """Replication factor of topics graphinfer creates (default 1)."""

    # --- PostgreSQL ----------------------------------------------------------
    database_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GRAPHINFER_DATABASE_URL", "DB_URL")
    )
    """PostgreSQL URL, ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE``. Required by worker and gateway."""
    database_pool_min_size: int = Field(default=1, ge=0, le=100)
    """Connections each process keeps open (default 1)."""
    database_pool_max_size: int = Field(default=5, ge=1, le=100)
    """Most connections each process opens (default 5)."""
    database_connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    """Seconds to wait for a connection at start-up (default 5)."""

    # --- Models --------------------------------------------------------------
    model_repository: Path = Path("model-repo")
    """Directory of ``NAME/VERSION/{model.joblib,manifest.json}`` (default ``model-repo``)."""
    model_paths: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict, validation_alias=AliasChoices("GRAPHINFER_MODEL_PATHS", "MODEL_PATHS")
    )
    """JSON object of model name to a version directory holding a manifest (older deployments)."""
    model_versions: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    """Pinned versions, ``name=version`` pairs separated by commas, or a JSON object."""
    model_trusted_sha256: Annotated[frozenset[str], NoDecode] = frozenset()
    """Comma-separated sha256 allow-list of artifacts; empty trusts every manifest's checksum."""
    default_models: Annotated[tuple[str, ...], NoDecode] = ()
    """Comma-separated models used when a request names neither models nor task."""
    model_keep_previous: int = Field(default=1, ge=0, le=100)
    """Versions before the newest that stay loaded, so ``name@version`` answers across a deploy (default 1)."""
    model_reload_interval_s: float = Field(default=30.0, ge=0, le=86_400)
    """Seconds between checks of the repository for new versions; 0 checks only on SIGHUP (default 30)."""
    model_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """Seconds one model call may take before it is reported as ``model_timeout`` (default 10)."""
    pool_processes: int = Field(default_factory=lambda: max(1, len(os.sched_getaffinity(0))), ge=1, le=256)
    """Inference processes (default: the CPUs this process may use)."""
    pool_memory_limit_mb: int = Field(default=4096, ge=0, le=1_048_576)
    """Address-space cap of each inference process in MiB; 0 sets none (default 4096)."""
    batch_max_size: int = Field(default=64, ge=1, le=10_000)
    """Requests per worker batch (default 64)."""
    batch_max_wait_ms: int = Field(default=5, ge=0, le=60_000)
    """Milliseconds a batch waits to fill before it runs (default 5)."""
    stream_buffer_maxsize: int = Field(default=4096, ge=1, le=1_000_000)
    """Messages the worker reads ahead of its agent per topic, at least 4 batches (default 4096)."""
    batch_retry_max_delay_s: float = Field(default=30.0, gt=0, le=3600)
    """Maximum wait in seconds between retries of a failed database or broker call of a batch (default 30)."""
    shutdown_timeout_s: float = Field(default=30.0, ge=0, le=3600)
    """Seconds a stopping worker waits for the batches in progress; the rest stay uncommitted (default 30, 0 waits as long as they take)."""
    fault_injection_raise_after_messages: int = Field(default=0, ge=0)
    """Testing only: the batch step raises once after this many messages, before storing; 0 never (default)."""

    # --- Limits --------------------------------------------------------------
    max_message_bytes: int = Field(default=1_000_000, ge=1_024, le=100_000_000)
    """Largest request in bytes (default 1,000,000)."""
    max_nodes: int = Field(default=20_000, ge=1, le=10_000_000)
    """Maximum nodes in one request graph (default 20,000)."""
    max_edges: int = Field(default=100_000, ge=0, le=100_000_000)
    """Maximum edges in one request graph (default 100,000)."""
    max_targets: int = Field(default=20_000, ge=1, le=10_000_000)
    """Most node plus edge targets in one request (default 20,000)."""

    # --- Replay ----------------------------------------------------------------
    replay_schedule: str = Field(
        default="0 0 * * *",
        validation_alias=AliasChoices("GRAPHINFER_REPLAY_SCHEDULE", "OFFLINE_TASK_SCHEDULE"),
    )
    """Five-field cron expression of the offline replay, or six fields with seconds first (default ``0 0 * * *``)."""
    replay_timezone: str = "UTC"
    """IANA time zone the schedule is read in (default UTC)."""
    replay_dataset: Path | None = None
    """Data set replayed on the schedule; none disables the scheduled replay."""
    replay_dataset_query: str | None = None
    """SQL query returning ``(id, graph[, label])`` ordered by id, replayed instead of a file (default none)."""
    replay_window: int = Field(default=1_000, ge=1, le=1_000_000)
    """Replay requests outstanding at once (default 1,000)."""
    replay_missed_ticks: Literal["latest", "skip"] = "latest"
    """A tick that passed while no worker led: ``latest`` runs the latest such tick late, ``skip`` drops it."""
    replay_stale_s: float = Field(default=60.0, gt=0, le=86_400)
    """Seconds without a heartbeat after which another process resumes a run (default 60)."""
    replay_batch_max_size: int = Field(default=16, ge=1, le=10_000)
    """Replayed requests per worker batch (default 16); processed two at a time while online requests arrive."""
    replay_share: float = Field(default=0.25, gt=0, le=1)
    """Largest fraction of a worker's time spent on replayed batches while online requests arrive (default 0.25)."""

    # --- Data retention ---------------------------------------------------------
    store_request_payloads: bool = False
    """Store each request's graph with its row in ``inference_requests`` (default false: only the reply)."""
    retention_requests_days: int = Field(default=30, ge=0, le=36_500)
    """Days a request row (with its reply and payload) is kept after completion; 0 keeps it forever (default 30)."""
    retention_predictions_days: int = Field(default=30, ge=0, le=36_500)
    """Days a prediction row is kept; 0 keeps it forever (default 30)."""
    retention_dead_letters_days: int = Field(default=14, ge=0, le=36_500)
    """Days a dead letter (with the original message bytes) is kept; 0 keeps it forever (default 14)."""
    retention_interval_s: float = Field(default=3_600.0, gt=0, le=604_800)
    """Seconds between clean-up runs on the leader (default 3,600)."""

    # --- Gateway and operations ------------------------------------------------
    gateway_host: str = "127.0.0.1"
    """Address the gateway listens on (default 127.0.0.1; 0.0.0.0 in containers)."""
    gateway_port: int = Field(default=8000, ge=0, le=65_535)
    """Port the gateway listens on (default 8000)."""
    gateway_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """Seconds ``POST /v1/predict`` waits for the reply before it returns 504 (default 30)."""
    gateway_max_timeout_s: float = Field(default=300.0, gt=0, le=3600)
    """Largest ``timeout_s`` a caller may set on ``POST /v1/predict``, in seconds (default 300)."""
    gateway_max_in_flight: int = Field(default=512, ge=1, le=100_000)
    """Maximum requests one gateway replica handles at once; more get 429 (default 512)."""
    api_keys: Annotated[dict[str, SecretStr], NoDecode] = Field(default_factory=dict)
    """API key to tenant map, ``tenant=key`` pairs separated by commas; empty runs the gateway open."""
    worker_metrics_host: str = "127.0.0.1"
    """Address the worker's Prometheus endpoint listens on (default 127.0.0.1; 0.0.0.0 in containers)."""
    worker_metrics_port: int = Field(default=0, ge=0, le=65_535)
    """Port of the worker's Prometheus endpoint; 0 picks a free one, so workers can share a host (default 0)."""
    log_format: Literal["text", "json"] = "text"
    """``text`` (default) or ``json`` lines."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level (default INFO)."""

    # --- validation ------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _warn_on_legacy_names(cls, data: Any) -> Any:
        for legacy, field_name in LEGACY_NAMES.items():
            modern = ENV_PREFIX + field_name.upper()
            if os.environ.get(legacy) is not None and os.environ.get(modern) is not None:
                logger.warning("both %s and %s are set; using %s", modern, legacy, modern)
                if isinstance(data, dict):
                    data[field_name] = os.environ[modern]
        return data

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in POSTGRES_SCHEMES:
            shown = f"{parts.scheme}://..." if parts.scheme else "a value without a scheme"
            raise ValueError(
                f"got {shown}; graphinfer stores its results in PostgreSQL, so the URL must have the "
                f"form {DATABASE_URL_FORM} (SQLite and other databases are not supported)"
            )
        if not parts.hostname and "host=" not in (parts.query or ""):
            raise ValueError(f"the URL names no host; expected {DATABASE_URL_FORM}")
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"{server.strip()!r} is not host:port; expected a comma-separated host:port list"
                )
        return value

    @field_validator("model_paths", mode="before")
    @classmethod
    def _parse_model_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{value[:80]!r} is not JSON; expected an object such as "
                    '{"cora-sgc": "/models/cora-sgc/3"}'
                ) from exc
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object of model name to directory")
        return value

    @field_validator("model_versions", mode="before")
    @classmethod
    def _parse_versions(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _parse_pairs(value, "name=version")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _parse_pairs(value, "tenant=key")
        return value

    @field_validator("model_trusted_sha256", mode="before")
    @classmethod
    def _parse_checksums(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [item.strip().lower() for item in value.split(",") if item.strip()]
        for checksum in value:
            if len(checksum) != 64 or any(char not in "0123456789abcdef" for char in checksum):
                raise ValueError(f"{checksum!r} is not a sha256 hex digest (64 hex characters)")
        return frozenset(value)

    @field_validator("default_models", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("replay_schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        from graphinfer.replay.schedule import check_expression

        return check_expression(value)

    @field_validator("replay_dataset_query")
    @classmethod
    def _one_replay_dataset(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value or not value.strip():
            return None
        if info.data.get("replay_dataset") is not None:
            raise ValueError(
                "GRAPHINFER_REPLAY_DATASET and GRAPHINFER_REPLAY_DATASET_QUERY are both set; set one of them"
            )
        return value

    @field_validator("replay_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"{value!r} is not an IANA time zone such as 'UTC' or 'Asia/Shanghai'") from exc
        return value

    # --- derived values --------------------------------------------------------

    @cached_property
    def bootstrap_servers(self) -> list[str]:
        if not self.kafka_bootstrap_servers:
            raise ConfigurationError(
                f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS is not set; set it to the Kafka brokers as a "
                "comma-separated host:port list, or pass --embedded to start a local broker"
            )
        return [server.strip() for server in self.kafka_bootstrap_servers.split(",")]

    @cached_property
    def dsn(self) -> str:
        if self.database_url is None:
            raise ConfigurationError(
                f"{ENV_PREFIX}DATABASE_URL is not set; set it to {DATABASE_URL_FORM}, "
                "or pass --embedded to use a local PostgreSQL"
            )
        return self.database_url.get_secret_value()

    def kafka_client_options(self) -> dict[str, Any]:
        """Return the aiokafka connection options every graphinfer client shares."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            if self.kafka_sasl_password is not None:
                options["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context()
        return options

    def secret_values(self) -> list[str]:
        """Return the configured secrets, so logs can mask them."""
        values = [key.get_secret_value() for key in self.api_keys.values()]
        if self.kafka_sasl_password is not None:
            values.append(self.kafka_sasl_password.get_secret_value())
        if self.database_url is not None:
            password = urlsplit(self.database_url.get_secret_value()).password
            if password:
                values.append(password)
        values.extend(trace_export_secrets(os.environ))
        return [value for value in values if value]

    def topic_partitions(self) -> dict[str, int]:
        return {
            self.request_topic: self.request_partitions,
            self.replay_topic: self.replay_partitions,
            self.prediction_topic: self.prediction_partitions,
            self.reply_topic: self.reply_partitions,
            self.dead_letter_topic: self.dead_letter_partitions,
        }


def _parse_pairs(text: str, form: str) -> dict[str, str]:
    text = text.strip()
    if text.startswith("{"):
        try:
            return dict(json.loads(text))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"{text[:80]!r} is not a JSON object; expected {form} pairs") from exc
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, separator, value = item.partition("=")
        if not separator or not name.strip() or not value.strip():
            raise ValueError(f"{item!r} is not {form}; expected comma-separated {form} pairs")
        pairs[name.strip()] = value.strip()
    return pairs


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning a validation error into one readable message.

    Raises :class:`ConfigurationError` naming each wrong variable, what it
    received and the expected form.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for error in exc.errors(include_url=False):
        location = error["loc"][0] if error["loc"] else ""
        variable = _variable_name(str(location))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "value_error":
            # pydantic's own messages name the expected type but not the value received.
            message = f"got {_shown(error.get('input'))}; {message[:1].lower()}{message[1:]}"
        lines.append(f"  {variable}: {message}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "a hidden value"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _variable_name(location: str) -> str:
    """Name the environment variable the user set for a field, old name included."""
    if location.upper() in LEGACY_NAMES:
        return location.upper()
    field_name = location.lower().removeprefix(ENV_PREFIX.lower())
    modern = ENV_PREFIX + field_name.upper()
    for legacy, target in LEGACY_NAMES.items():
        if target == field_name and os.environ.get(legacy) is not None and os.environ.get(modern) is None:
            return legacy
    return modern


def trace_export_secrets(environ: Mapping[str, str]) -> list[str]:
    """Return the credentials in OpenTelemetry's OTLP exporter variables, so logs can mask them.

    These are the header values, and the user info and query values of the endpoints. The
    OpenTelemetry SDK reads these variables itself, and its export errors may quote them.
    """
    values: list[str] = []
    for name in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
        for pair in environ.get(name, "").split(","):
            _, separator, value = pair.partition("=")
            if separator and value.strip():
                values.extend({value.strip(), unquote(value.strip())})
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        try:
            parts = urlsplit(environ.get(name, "").strip())
            password, username = parts.password, parts.username
        except ValueError:
            continue
        # A lone user name, as in https://TOKEN@host/, is a token itself.
        secret = password or username
        if secret:
            values.append(unquote(secret))
        values.extend(value for _, value in parse_qsl(parts.query))
    return values
