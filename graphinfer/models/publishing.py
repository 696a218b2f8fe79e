"""Publish a trained model into a model repository as ``NAME/VERSION``.

Each version is written into a staging directory beside its final place and
renamed into place only when complete, so a scanner never finds half a model.
An existing version directory is never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import joblib
import networkx
import numpy as np
import scipy
import sklearn

import graphinfer
from graphinfer.models.datasets import DATA_PACKAGE
from graphinfer.models.manifest import (
    ARTIFACT_NAME,
    MANIFEST_NAME,
    FeatureSpec,
    InputSignature,
    Manifest,
    Metric,
    OutputSpec,
    TrainingInfo,
)
from graphinfer.models.repository import read_manifest

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

STAGING_PREFIX = ".staging-"
#: The version under which ``graphinfer models train-demo`` publishes each demo model.
DEMO_VERSION = 1


@dataclass(frozen=True)
class TrainedModel:
    """A fitted estimator and every manifest field except checksum and creation time."""

    name: str
    task: Literal["node", "edge", "graph"]
    description: str
    estimator: Any
    input: InputSignature
    features: FeatureSpec
    training: TrainingInfo
    metrics: dict[str, Metric]
    output_kind: Literal["classes", "score"] = "classes"
    positive_class: str | None = None

    @property
    def class_names(self) -> list[str]:
        return [str(name) for name in self.estimator.classes_]


def publish(
    repository: Path, version: int, trained: TrainedModel, progress: Progress | None = None
) -> Manifest:
    """Write ``trained`` as ``repository/NAME/VERSION`` through a staging directory.

    The artifact and manifest go into ``NAME/.staging-VERSION-*`` first, which
    is renamed to ``NAME/VERSION`` once both are on disk. The staging
    directory is removed on any failure. When the version directory appears
    meanwhile, the staging copy is dropped and the existing manifest returned.
    """
    report = progress or ignore_progress
    model_dir = Path(repository) / trained.name
    target = model_dir / str(version)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=model_dir))
    try:
        # mkdtemp creates the directory with mode 0700, but workers that run as
        # another user must be able to read the published version.
        os.chmod(staging, 0o755)
        artifact = serialise(trained.estimator)
        _write_file(staging / ARTIFACT_NAME, artifact)
        digest = hashlib.sha256(artifact).hexdigest()
        report(f"{trained.name}: wrote {ARTIFACT_NAME}, {len(artifact)} bytes, sha256 {digest}")

        manifest = build_manifest(trained, version, digest)
        _write_file(staging / MANIFEST_NAME, (manifest.model_dump_json(indent=2) + "\n").encode())
        _fsync_directory(staging)

        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return existing_manifest(target, report)
        _fsync_directory(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info("published model=%s version=%s path=%s sha256=%s", manifest.name, version, target, digest)
    report(f"{trained.name}: published version {version} at {target}")
    return manifest


def build_manifest(trained: TrainedModel, version: int, sha256: str) -> Manifest:
    """Return the manifest of ``trained`` as ``version`` with artifact checksum ``sha256``, created now."""
    return Manifest(
        name=trained.name,
        version=version,
        task=trained.task,
        description=trained.description,
        input=trained.input,
        features=trained.features,
        output=OutputSpec(
            kind=trained.output_kind,
            class_names=trained.class_names,
            positive_class=trained.positive_class,
        ),
        artifact=ARTIFACT_NAME,
        sha256=sha256,
        training=trained.training,
        metrics=trained.metrics,
        library_versions=library_versions(),
        created_at=datetime.now(UTC),
    )


def draft_manifest(trained: TrainedModel) -> Manifest:
    """Return the manifest ``trained`` would get as the demo version, to serve it before publishing."""
    return build_manifest(trained, DEMO_VERSION, hashlib.sha256(serialise(trained.estimator)).hexdigest())


def library_versions() -> dict[str, str]:
    """Return the versions of the libraries whose behaviour a trained model depends on."""
    return {
        "python": platform.python_version(),
        "graphinfer": graphinfer.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "networkx": networkx.__version__,
        "joblib": joblib.__version__,
    }


def ignore_progress(message: str) -> None:
    """Discard a progress line when the caller passed no ``progress``."""


def existing_manifest(target: Path, progress: Progress) -> Manifest:
    manifest = read_manifest(target)
    logger.info("model version exists, not retrained model=%s path=%s", manifest.name, target)
    progress(f"{manifest.name}: version {manifest.version} already exists at {target}; skipped")
    return manifest


def data_source(file_name: str) -> str:
    data = resources.files(DATA_PACKAGE).joinpath(file_name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return f"{DATA_PACKAGE.replace('.', '/')}/{file_name} (sha256 {digest}); see DATA.md"


def serialise(estimator: Any) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    return buffer.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
