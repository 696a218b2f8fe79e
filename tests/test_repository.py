"""The model repository: integrity checks, versions, pinning and what stays loaded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from graphinfer.errors import GraphinferError
from graphinfer.models.manifest import ARTIFACT_NAME, MANIFEST_NAME
from graphinfer.models.repository import ModelRefused, load_estimator, scan
from tests import fake_models
from tests.model_factory import write_model


def refs(catalog) -> list[str]:
    return sorted(entry.ref for entry in catalog.entries())


def test_tampered_artifact_refused_others_serve(tmp_path: Path) -> None:
    write_model(tmp_path, "good", 1, fake_models.ConstantModel([0.5, 0.5]))
    version_dir = write_model(tmp_path, "tampered", 1, fake_models.ConstantModel([0.5, 0.5]))
    artifact = version_dir / ARTIFACT_NAME
    artifact.write_bytes(artifact.read_bytes() + b"\0")

    catalog = scan(tmp_path)
    assert refs(catalog) == ["good@1"]
    [refusal] = catalog.refusals
    assert refusal.path == version_dir
    assert "sha256" in refusal.reason


def test_tampered_artifact_and_manifest_refused_by_allow_list(tmp_path: Path) -> None:
    good_dir = write_model(tmp_path, "good", 1, fake_models.ConstantModel([0.5, 0.5]))
    bad_dir = write_model(tmp_path, "swapped", 1, fake_models.ConstantModel([0.5, 0.5]))
    trusted = frozenset({json.loads((good_dir / MANIFEST_NAME).read_text())["sha256"]})
    # An attacker who can write the artifact can also rewrite its manifest's checksum.
    new_bytes = (bad_dir / ARTIFACT_NAME).read_bytes() + b"\0"
    (bad_dir / ARTIFACT_NAME).write_bytes(new_bytes)
    manifest = json.loads((bad_dir / MANIFEST_NAME).read_text())
    manifest["sha256"] = hashlib.sha256(new_bytes).hexdigest()
    (bad_dir / MANIFEST_NAME).write_text(json.dumps(manifest))

    assert refs(scan(tmp_path)) == ["good@1", "swapped@1"], "without an allow-list the manifest is trusted"
    catalog = scan(tmp_path, trusted_sha256=trusted)
    assert refs(catalog) == ["good@1"]
    assert "GRAPHINFER_MODEL_TRUSTED_SHA256" in catalog.refusals[0].reason


def test_loader_unpickles_checked_bytes_only(tmp_path: Path) -> None:
    version_dir = write_model(tmp_path, "model", 1, fake_models.ConstantModel([0.1, 0.9]))
    entry = scan(tmp_path).resolve("model")
    (version_dir / ARTIFACT_NAME).write_bytes(b"replaced after the scan")
    with pytest.raises(ModelRefused, match="sha256"):
        load_estimator(entry, frozenset())


def test_world_writable_repository_refused(tmp_path: Path) -> None:
    write_model(tmp_path, "model", 1, fake_models.ConstantModel([0.5, 0.5]))
    os.chmod(tmp_path, 0o777)
    try:
        catalog = scan(tmp_path)
    finally:
        os.chmod(tmp_path, 0o755)
    assert refs(catalog) == []
    assert "chmod o-w" in catalog.refusals[0].reason


def test_world_writable_version_refused(tmp_path: Path) -> None:
    write_model(tmp_path, "model", 1, fake_models.ConstantModel([0.5, 0.5]))
    open_dir = write_model(tmp_path, "model", 2, fake_models.ConstantModel([0.5, 0.5]))
    os.chmod(open_dir, 0o777)
    catalog = scan(tmp_path)
    assert refs(catalog) == ["model@1"]


def test_major_sklearn_mismatch_refused(tmp_path: Path) -> None:
    write_model(
        tmp_path, "old", 1, fake_models.ConstantModel([0.5, 0.5]), library_versions={"scikit-learn": "0.24.2"}
    )
    catalog = scan(tmp_path)
    assert refs(catalog) == []
    assert "scikit-learn 0.24.2" in catalog.refusals[0].reason


def test_minor_sklearn_mismatch_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import sklearn

    major = sklearn.__version__.split(".")[0]
    write_model(
        tmp_path,
        "minor",
        1,
        fake_models.ConstantModel([0.5, 0.5]),
        library_versions={"scikit-learn": f"{major}.0.0"},
    )
    with caplog.at_level(logging.WARNING, logger="graphinfer.models.repository"):
        catalog = scan(tmp_path)
    assert refs(catalog) == ["minor@1"]
    assert f"trained={major}.0.0" in caplog.text
    assert f"installed={sklearn.__version__}" in caplog.text


def test_staging_and_half_copied_versions_ignored(tmp_path: Path) -> None:
    write_model(tmp_path, "model", 1, fake_models.ConstantModel([0.5, 0.5]))
    staging = tmp_path / "model" / ".staging-2-abc"
    staging.mkdir()
    (staging / ARTIFACT_NAME).write_bytes(b"partial")
    half = tmp_path / "model" / "3"
    half.mkdir()
    (half / ARTIFACT_NAME).write_bytes(b"partial, no manifest yet")

    catalog = scan(tmp_path)
    assert refs(catalog) == ["model@1"]
    assert catalog.resolve("model").version == 1


def test_newest_serves_previous_kept(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        write_model(tmp_path, "model", version, fake_models.ConstantModel([0.5, 0.5]))
    catalog = scan(tmp_path, keep_previous=1)
    assert refs(catalog) == ["model@2", "model@3"]
    assert catalog.resolve("model").version == 3
    assert catalog.resolve("model@2").version == 2
    with pytest.raises(GraphinferError) as caught:
        catalog.resolve("model@1")
    assert caught.value.code == "unknown_model"
    assert "GRAPHINFER_MODEL_VERSIONS" in caught.value.message


def test_pinned_version_wins(tmp_path: Path) -> None:
    for version in (1, 2, 3, 4):
        write_model(tmp_path, "model", version, fake_models.ConstantModel([0.5, 0.5]))
    catalog = scan(tmp_path, pinned={"model": 1}, keep_previous=1)
    assert catalog.resolve("model").version == 1
    assert refs(catalog) == ["model@1", "model@3", "model@4"]


def test_model_paths_without_manifest_refused(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / ARTIFACT_NAME).write_bytes(b"old artifact")
    catalog = scan(tmp_path / "empty-repository", model_paths={"legacy": legacy / ARTIFACT_NAME})
    assert refs(catalog) == []
    reason = catalog.refusals[0].reason
    assert "manifest.json" in reason
    assert "graphinfer models validate" in reason


def test_model_paths_with_manifest_loads(tmp_path: Path) -> None:
    version_dir = write_model(tmp_path / "elsewhere", "legacy", 5, fake_models.ConstantModel([0.5, 0.5]))
    catalog = scan(tmp_path / "empty-repository", model_paths={"legacy": version_dir})
    assert refs(catalog) == ["legacy@5"]
