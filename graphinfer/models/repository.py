"""The model repository: ``NAME/VERSION/{model.joblib,manifest.json}``.

Scanning reads manifests and checks artifact checksums; loading reads an
artifact's bytes once, checks their sha256 against the manifest (and the
trusted allow-list when one is set) and unpickles those same bytes. A model
that fails a check is logged with its file and reason and left out; the
others still serve.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
from pydantic import ValidationError

from graphinfer.errors import ErrorDetail, GraphinferError
from graphinfer.models.manifest import ARTIFACT_NAME, MANIFEST_NAME, Manifest

logger = logging.getLogger(__name__)


class ModelRefused(Exception):
    """A model version failed a check and is not served.

    The operator fixes the file named in the message (re-export the model,
    rewrite its manifest, or add its checksum to
    ``GRAPHINFER_MODEL_TRUSTED_SHA256``) and restarts or waits for a reload.
    """


@dataclass(frozen=True)
class ModelEntry:
    """One servable model version: its manifest and where its files are."""

    manifest: Manifest
    directory: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    @property
    def artifact_path(self) -> Path:
        return self.directory / self.manifest.artifact


@dataclass(frozen=True)
class Refusal:
    path: Path
    reason: str


class ModelCatalog:
    """The model versions this process serves, by name and version."""

    def __init__(self, entries: Iterable[ModelEntry], refusals: Iterable[Refusal] = ()) -> None:
        self._by_name: dict[str, dict[int, ModelEntry]] = {}
        self._serving: dict[str, int] = {}
        self._pinned: dict[str, int] = {}
        for entry in entries:
            self._by_name.setdefault(entry.name, {})[entry.version] = entry
        self.refusals = tuple(refusals)

    def set_serving(self, pinned: Mapping[str, int]) -> None:
        self._pinned = dict(pinned)
        for name, versions in self._by_name.items():
            pin = pinned.get(name)
            if pin is not None and pin not in versions:
                logger.warning(
                    "pinned version not available, serving the newest model=%s pinned=%d serving=%d",
                    name,
                    pin,
                    max(versions),
                )
            self._serving[name] = pin if pin in versions else max(versions)

    def retained(self, pinned: Mapping[str, int], keep_previous: int) -> ModelCatalog:
        """Return a catalog of the pinned, the newest and ``keep_previous`` earlier versions."""
        kept: list[ModelEntry] = []
        for name, versions in self._by_name.items():
            ordered = sorted(versions)
            wanted = set(ordered[-(keep_previous + 1) :])
            if pinned.get(name) in versions:
                wanted.add(pinned[name])
            kept.extend(versions[number] for number in sorted(wanted))
        catalog = ModelCatalog(kept, self.refusals)
        catalog.set_serving(pinned)
        return catalog

    def restricted(self, refs: set[str]) -> ModelCatalog:
        """Return a catalog of only the given ``name@version`` refs (those the pool loaded)."""
        catalog = ModelCatalog([entry for entry in self.entries() if entry.ref in refs], self.refusals)
        catalog.set_serving(self._pinned)
        return catalog

    def fingerprint(self) -> frozenset[tuple[str, str]]:
        """Return the served refs with their checksums; equal fingerprints need no reload."""
        return frozenset((entry.ref, entry.manifest.sha256) for entry in self.entries())

    def serving(self) -> list[ModelEntry]:
        """The version of each model that serves unqualified names, sorted by name."""
        return [self._by_name[name][version] for name, version in sorted(self._serving.items())]

    def entries(self) -> list[ModelEntry]:
        return [entry for versions in self._by_name.values() for entry in versions.values()]

    def resolve(self, ref: str) -> ModelEntry:
        """Find ``name`` (its serving version) or ``name@version``.

        Raises :class:`GraphinferError` with code ``unknown_model``.
        """
        name, _, version_text = ref.partition("@")
        versions = self._by_name.get(name)
        if not versions:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise GraphinferError(
                f"model {name!r} is not served here (served: {known}); name a served model or omit models",
                code="unknown_model",
                details=[ErrorDetail("models", ref, sorted(self._by_name))],
            )
        if not version_text:
            return versions[self._serving.get(name, max(versions))]
        version = int(version_text)
        if version not in versions:
            loaded = ", ".join(str(number) for number in sorted(versions))
            raise GraphinferError(
                f"model {name!r} has no loaded version {version} (loaded: {loaded}); name a loaded "
                "version, or pin it with GRAPHINFER_MODEL_VERSIONS",
                code="unknown_model",
                details=[ErrorDetail("models", ref, sorted(versions))],
            )
        return versions[version]

    def __len__(self) -> int:
        return len(self._serving)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """Read and validate ``manifest.json`` in a version directory."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ModelRefused(
            f"{path} is missing; every model version directory needs a manifest.json beside its "
            f"{ARTIFACT_NAME}, with name, version, task, input, features, output, sha256 (of the "
            "artifact's bytes), training, metrics, library_versions and created_at, as described under "
            "'Model repository' in the README; check the directory with `graphinfer models validate DIR`"
        )
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelRefused(f"{path} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()[:5]
        )
        raise ModelRefused(f"{path} is not a valid manifest: {problems}") from None
    return manifest


def read_verified_artifact(entry: ModelEntry, trusted_sha256: frozenset[str]) -> bytes:
    """Read the artifact's bytes once and check them; return the checked bytes."""
    path = entry.artifact_path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelRefused(f"{path} cannot be read: {exc.strerror}") from None
    digest = sha256_hex(data)
    if digest != entry.manifest.sha256:
        raise ModelRefused(
            f"{path} has sha256 {digest}, but its manifest says {entry.manifest.sha256}; the artifact "
            "changed after its manifest was written, so re-export the model or restore the file"
        )
    if trusted_sha256 and digest not in trusted_sha256:
        raise ModelRefused(
            f"{path} has sha256 {digest}, which GRAPHINFER_MODEL_TRUSTED_SHA256 does not list; add "
            "the checksum to that setting if you trust this artifact"
        )
    return data


def load_estimator(entry: ModelEntry, trusted_sha256: frozenset[str]) -> Any:
    """Load a model's estimator from bytes that passed the checksum checks."""
    data = read_verified_artifact(entry, trusted_sha256)
    try:
        return joblib.load(io.BytesIO(data))
    except Exception as exc:  # unpickling can raise nearly anything
        raise ModelRefused(f"{entry.artifact_path} could not be unpickled: {exc!r}") from None


def scan(
    repository: Path,
    *,
    model_paths: Mapping[str, Path] | None = None,
    trusted_sha256: frozenset[str] = frozenset(),
    pinned: Mapping[str, int] | None = None,
    keep_previous: int = 1,
) -> ModelCatalog:
    """Find the servable model versions and check their manifests and checksums.

    Version directories are positive integers; anything else (a staging
    directory such as ``.staging-...``) is ignored, so a version appears
    only once it has been renamed into place complete. Of each model, the
    pinned version, the newest and ``keep_previous`` versions before the
    newest are kept, so ``name@version`` keeps answering across a deploy.
    """
    entries: list[ModelEntry] = []
    refusals: list[Refusal] = []

    def consider(directory: Path, expected_name: str | None) -> None:
        try:
            manifest = read_manifest(directory)
            if expected_name is not None and manifest.name != expected_name:
                raise ModelRefused(
                    f"{directory / MANIFEST_NAME} names model {manifest.name!r}, but it sits under "
                    f"{expected_name!r}; rename the directory or fix the manifest's name"
                )
            if directory.name.isdigit() and int(directory.name) != manifest.version:
                raise ModelRefused(
                    f"{directory / MANIFEST_NAME} says version {manifest.version}, but its directory "
                    f"is {directory.name}; the directory name must be the version"
                )
            _check_not_world_writable(directory)
            check_library_versions(manifest, directory)
            entry = ModelEntry(manifest=manifest, directory=directory)
            read_verified_artifact(entry, trusted_sha256)
            entries.append(entry)
        except ModelRefused as exc:
            logger.error("model rejected path=%s reason=%s", directory, exc)
            refusals.append(Refusal(directory, str(exc)))

    if repository.is_dir():
        try:
            _check_not_world_writable(repository)
        except ModelRefused as exc:
            logger.error("model repository rejected path=%s reason=%s", repository, exc)
            refusals.append(Refusal(repository, str(exc)))
        else:
            for model_dir in sorted(repository.iterdir()):
                if model_dir.name.startswith(".") or not model_dir.is_dir():
                    continue
                try:
                    _check_not_world_writable(model_dir)
                except ModelRefused as exc:
                    logger.error("model rejected path=%s reason=%s", model_dir, exc)
                    refusals.append(Refusal(model_dir, str(exc)))
                    continue
                versions = [
                    path
                    for path in model_dir.iterdir()
                    if path.is_dir() and path.name.isdigit() and int(path.name) > 0
                ]
                for version_dir in sorted(versions, key=lambda path: int(path.name)):
                    consider(version_dir, model_dir.name)
    for name, path in (model_paths or {}).items():
        directory = path if path.is_dir() else path.parent
        consider(directory, name)

    catalog = ModelCatalog(entries, refusals)
    catalog.set_serving(pinned or {})
    return catalog.retained(pinned or {}, keep_previous)


def _check_not_world_writable(path: Path) -> None:
    mode = os.stat(path).st_mode
    if mode & stat.S_IWOTH:
        raise ModelRefused(
            f"{path} is writable by every user (mode {stat.filemode(mode)}), so anyone could "
            f"replace a model; run `chmod o-w {path}`"
        )


def check_library_versions(manifest: Manifest, directory: Path) -> None:
    """Refuse a model trained with another major scikit-learn; warn on a minor difference."""
    import sklearn

    trained = manifest.library_versions.get("scikit-learn")
    if trained is None:
        return
    installed = sklearn.__version__
    trained_parts, installed_parts = trained.split("."), installed.split(".")
    if trained_parts[0] != installed_parts[0]:
        raise ModelRefused(
            f"{directory / MANIFEST_NAME} was trained with scikit-learn {trained}, but {installed} is "
            "installed; a major version change can unpickle into a different model, so retrain it "
            f"with scikit-learn {installed_parts[0]}.x"
        )
    if trained_parts[:2] != installed_parts[:2]:
        logger.warning(
            "model trained with another scikit-learn minor version model=%s version=%d trained=%s installed=%s",
            manifest.name,
            manifest.version,
            trained,
            installed,
        )
