"""The ``graphinfer`` command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from graphinfer.errors import ConfigurationError
from graphinfer.logs import configure_logging
from graphinfer.settings import Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def _maybe_embedded(embedded: bool, database_name: str = "graphinfer") -> Iterator[None]:
    """Start the embedded broker and database when asked, and point the settings at them."""
    if not embedded:
        yield
        return
    from graphinfer.embedded import EmbeddedStack, terminate_on_sigterm

    # Configured before the settings are read, so the stack's start-up is logged.
    configure_logging(
        os.environ.get("GRAPHINFER_LOG_LEVEL", "INFO"), os.environ.get("GRAPHINFER_LOG_FORMAT", "text")
    )

    stack = EmbeddedStack(database_name=database_name)
    with terminate_on_sigterm():
        try:
            asyncio.run(stack.start())
            os.environ.update(stack.environment())
            yield
        finally:
            stack.stop()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphinfer")
def main() -> None:
    """graphinfer: graph inference over Kafka, with results in PostgreSQL."""


@main.command()
@click.option("--embedded", is_flag=True, help="Start the embedded broker and use a local PostgreSQL.")
def worker(embedded: bool) -> None:
    """Run an inference worker (consumes the request topic)."""
    with _maybe_embedded(embedded):
        settings = _settings()
        configure_logging(settings.log_level, settings.log_format, settings.secret_values())
        from graphinfer.streams.runner import run_worker

        try:
            run_worker(settings)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--embedded", is_flag=True, help="Start the embedded broker and use a local PostgreSQL.")
def gateway(embedded: bool) -> None:
    """Run the HTTP gateway."""
    with _maybe_embedded(embedded):
        settings = _settings()
        configure_logging(settings.log_level, settings.log_format, settings.secret_values())
        from graphinfer.api.server import run_gateway

        try:
            run_gateway(settings)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--embedded", is_flag=True, help="Use a local PostgreSQL instead of GRAPHINFER_DATABASE_URL.")
def migrate(embedded: bool) -> None:
    """Apply pending database migrations and exit."""
    with _maybe_embedded(embedded):
        settings = _settings()
        configure_logging(settings.log_level, settings.log_format, settings.secret_values())
        from graphinfer.storage.db import Database

        async def _migrate() -> None:
            database = await Database.connect(settings.dsn, min_size=0, max_size=1)
            await database.close()

        try:
            asyncio.run(_migrate())
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo("database schema is up to date")


@main.command(short_help="Run the main job on real data (MUTAG, Cora).")
@click.option(
    "--repository", type=click.Path(path_type=Path), help="Model repository (default: the setting)."
)
@click.option("--window", default=8, show_default=True, help="Requests in flight at once.")
@click.option("--cora-limit", type=int, default=None, help="Send only the first N Cora test nodes.")
def demo(repository: Path | None, window: int, cora_limit: int | None) -> None:
    """Run the main job on real data: embedded stack, worker, MUTAG and Cora requests."""
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    from graphinfer.demo import run_demo

    try:
        code = run_demo(settings, repository=repository, window=window, cora_limit=cora_limit)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command(short_help="Publish requests from a file; print replies.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--timeout", "timeout_s", default=60.0, show_default=True, help="Seconds to wait for all replies."
)
def send(path: Path, timeout_s: float) -> None:
    """Publish the requests in a JSON or JSON Lines file and print each reply."""
    settings = _settings()
    configure_logging("WARNING", settings.log_format, settings.secret_values())
    from graphinfer.client import send_file

    try:
        missing = asyncio.run(send_file(settings, path, timeout_s=timeout_s, echo=click.echo))
    except (ConfigurationError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if missing:
        raise click.ClickException(f"{missing} requests got no reply within {timeout_s} s")


@main.command()
@click.option(
    "--kind",
    type=click.Choice(["mutag", "cora"]),
    default="mutag",
    show_default=True,
    help="MUTAG graph requests or Cora ego-subgraph node requests.",
)
@click.option("--requests", "count", default=1_000, show_default=True, help="Requests to send.")
@click.option("--window", default=8, show_default=True, help="Requests in flight at once.")
@click.option("--embedded", is_flag=True, help="Start the embedded broker, a database and one worker.")
def bench(kind: str, count: int, window: int, embedded: bool) -> None:
    """Measure throughput and latency from publish to reply."""
    settings = _settings()
    configure_logging("WARNING", settings.log_format, settings.secret_values())
    from graphinfer.bench import run_bench

    try:
        click.echo(run_bench(settings, kind=kind, count=count, window=window, embedded=embedded))
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None


@main.command(short_help="Replay a data set, resume a run, list runs.")
@click.option(
    "--now", "start_now", is_flag=True, help="Start a run of the data set now, published from this process."
)
@click.option(
    "--resume",
    "resume_id",
    metavar="RUN_ID",
    help="Resume a run that stopped: interrupted, failed, or whose publisher stopped heartbeating.",
)
@click.option("--list", "show_list", is_flag=True, help="List recent runs with their counts.")
@click.option(
    "--dataset",
    type=click.Path(path_type=Path),
    help="JSON Lines file (gzip or not) or directory of .json files (default: GRAPHINFER_REPLAY_DATASET).",
)
@click.option(
    "--query",
    help="SQL query returning (id, graph[, label]) ordered by id (default: GRAPHINFER_REPLAY_DATASET_QUERY).",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Stay until every record is stored, with progress, then print counts and accuracy.",
)
@click.option("--limit", default=20, show_default=True, help="Runs shown by --list.")
@click.option(
    "--embedded",
    is_flag=True,
    help="Start the embedded broker, a local PostgreSQL and a worker; implies --wait.",
)
def replay(
    start_now: bool,
    resume_id: str | None,
    show_list: bool,
    dataset: Path | None,
    query: str | None,
    wait: bool,
    limit: int,
    embedded: bool,
) -> None:
    """Replay a data set through the inference path, resume a run, or list runs."""
    if start_now + (resume_id is not None) + show_list != 1:
        raise click.UsageError("pass exactly one of --now, --resume RUN_ID and --list")
    if (dataset is not None or query) and not start_now:
        raise click.UsageError("--dataset and --query apply only to --now")
    if start_now:
        action = "now"
    elif resume_id is not None:
        action = "resume"
    else:
        action = "list"
    with _maybe_embedded(embedded):
        settings = _settings()
        # Progress and results go to stdout; only warnings are logged unless DEBUG is asked for.
        configure_logging(
            "DEBUG" if settings.log_level == "DEBUG" else "WARNING",
            settings.log_format,
            settings.secret_values(),
        )
        from graphinfer.replay.command import ReplayCommandError, resolve_dataset, run_command

        try:
            spec = resolve_dataset(settings, dataset, query) if action == "now" else None
            code = run_command(
                settings,
                action=action,
                spec=spec,
                run_id=resume_id,
                wait=wait or embedded,
                limit=limit,
                with_worker=embedded and action != "list",
            )
        except (ConfigurationError, ReplayCommandError) as exc:
            raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.group()
def models() -> None:
    """Inspect, validate and train models."""


@models.command("list")
@click.option(
    "--repository", type=click.Path(path_type=Path), help="Model repository (default: the setting)."
)
def models_list(repository: Path | None) -> None:
    """List the models in the repository and the feature extractors."""
    settings = _settings()
    if repository is not None:
        settings = settings.model_copy(update={"model_repository": repository})
    configure_logging("WARNING", settings.log_format, settings.secret_values())
    from graphinfer.models import features
    from graphinfer.models.repository import scan

    if not settings.model_repository.is_dir() and not settings.model_paths:
        raise click.ClickException(
            f"the model repository {settings.model_repository} does not exist (--repository or GRAPHINFER_MODEL_REPOSITORY); "
            "set the setting, or create one with `graphinfer models train-demo`"
        )
    catalog = scan(
        settings.model_repository,
        model_paths=settings.model_paths,
        trusted_sha256=settings.model_trusted_sha256,
        pinned=settings.model_versions,
    )
    serving = {entry.ref for entry in catalog.serving()}
    click.echo(f"models in {settings.model_repository}:")
    for entry in sorted(catalog.entries(), key=lambda item: (item.name, item.version)):
        manifest = entry.manifest
        metrics = ", ".join(f"{name}={metric.value:.3f}" for name, metric in manifest.metrics.items())
        marker = "*" if entry.ref in serving else " "
        click.echo(
            f" {marker} {entry.ref:<20} task={manifest.task:<5} features={manifest.features.name}"
            f"@{manifest.features.version} {metrics}"
        )
    for refusal in catalog.refusals:
        click.echo(f"   refused {refusal.path}: {refusal.reason}")
    click.echo("(* serves requests that name the model without a version)")
    click.echo("feature extractors:")
    for extractor in features.describe():
        click.echo(f"   {extractor['name']}@{extractor['version']} task={extractor['task']}")
        click.echo(f"       {extractor['description']}")
        for key in ("multigraph", "self_loops", "direction", "cost"):
            if extractor.get(key):
                click.echo(f"       {key}: {extractor[key]}")


@models.command("validate", short_help="Check one model version directory.")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def models_validate(path: Path) -> None:
    """Check a model version directory: manifest, checksum and loading."""
    settings = _settings()
    from graphinfer.models.repository import ModelEntry, ModelRefused, load_estimator, read_manifest

    try:
        manifest = read_manifest(path)
        load_estimator(ModelEntry(manifest, path), settings.model_trusted_sha256)
    except ModelRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        json.dumps(
            {
                "model": manifest.name,
                "version": manifest.version,
                "task": manifest.task,
                "sha256": manifest.sha256,
                "valid": True,
            }
        )
    )


@models.command("train-demo", short_help="Train the five demo models.")
@click.option(
    "--repository", type=click.Path(path_type=Path), help="Model repository (default: the setting)."
)
@click.option("--seed", default=0, show_default=True, help="Random seed of splits and models.")
def models_train_demo(repository: Path | None, seed: int) -> None:
    """Train the five demo models (mutag-wl, cora-sgc, cora-links, otc-fraud, karate-club) as version 1."""
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    from graphinfer.models.training import DEMO_MODELS, train_demo
    from graphinfer.progress import open_progress

    target = repository or settings.model_repository
    with open_progress("training", len(DEMO_MODELS), unit="models") as display:
        manifests = train_demo(
            target,
            seed=seed,
            progress=display.write,
            model_progress=lambda done, total: display.update_to(done),
        )
    for manifest in manifests:
        metrics = ", ".join(
            f"{name}={metric.value:.3f}" + (f"±{metric.std:.3f}" if metric.std is not None else "")
            for name, metric in manifest.metrics.items()
        )
        click.echo(f"{manifest.name}@{manifest.version} ({manifest.task}): {metrics}")


if __name__ == "__main__":
    main()
