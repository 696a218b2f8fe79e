"""Tests of demo-model training and publishing into a model repository."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from graphinfer.models.datasets import load_mutag, mutag_holdout_split, mutag_request
from graphinfer.models.features import extract
from graphinfer.models.graph import build_graph
from graphinfer.models.manifest import (
    ARTIFACT_NAME,
    MANIFEST_NAME,
    FeatureSpec,
    InputSignature,
    Manifest,
    Metric,
    TrainingInfo,
)
from graphinfer.models.repository import ModelRefused
from graphinfer.models.schema import PredictRequest
from graphinfer.models.training import (
    CORA_MODEL,
    DEMO_MODELS,
    MUTAG_MODEL,
    STAGING_PREFIX,
    TrainedModel,
    publish,
    train_demo,
)
from tests.conftest import DemoTraining

MUTAG_ACCURACY_BAR = 0.80
CORA_TEST_BAR = 0.75
LINK_AUC_BAR = 0.85
FRAUD_AUC_BAR = 0.65
LEAKING_FRAUD_AUC_BAR = 0.95
KARATE_ACCURACY_BAR = 0.80
LINK_MODEL = "cora-links"
FRAUD_MODEL = "otc-fraud"
KARATE_MODEL = "karate-club"
ROOT = Path(__file__).resolve().parent.parent


class TrainedRepository:
    def __init__(self, path: Path, manifests: list[Manifest], progress: list[str]) -> None:
        self.path = path
        self.manifests = {manifest.name: manifest for manifest in manifests}
        self.order = [manifest.name for manifest in manifests]
        self.progress = progress

    def version_dir(self, name: str) -> Path:
        return self.path / name / "1"

    def load_estimator(self, name: str) -> Any:
        return joblib.load(io.BytesIO((self.version_dir(name) / ARTIFACT_NAME).read_bytes()))


@pytest.fixture(scope="module")
def trained(demo_training: DemoTraining) -> TrainedRepository:
    # The session's demo repository, so the suite trains the demo models once.
    return TrainedRepository(demo_training.repository, demo_training.manifests, demo_training.progress)


def tiny_model(name: str = "tiny") -> TrainedModel:
    features = np.array([[0.0], [1.0], [2.0], [3.0]])
    estimator = LogisticRegression().fit(features, ["low", "low", "high", "high"])
    return TrainedModel(
        name=name,
        task="graph",
        description="Test model.",
        estimator=estimator,
        input=InputSignature(task="graph", node_attributes=["label"], directed=False),
        features=FeatureSpec(name="wl_histogram", params={}, version=1),
        training=TrainingInfo(dataset="four points", source="this test", split="none"),
        metrics={"train_accuracy": Metric(value=1.0, protocol="training points")},
    )


def staging_entries(repository: Path) -> list[Path]:
    return [path for path in repository.rglob("*") if path.name.startswith(STAGING_PREFIX)]


def test_train_demo_returns_every_model(trained: TrainedRepository) -> None:
    assert trained.order == [MUTAG_MODEL, CORA_MODEL, LINK_MODEL, FRAUD_MODEL, KARATE_MODEL]
    assert trained.order == list(DEMO_MODELS)
    assert all(manifest.version == 1 for manifest in trained.manifests.values())


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_train_demo_manifest_file_validates(trained: TrainedRepository, name: str) -> None:
    text = (trained.version_dir(name) / MANIFEST_NAME).read_text(encoding="utf-8")
    assert Manifest.model_validate(json.loads(text)) == trained.manifests[name]


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_train_demo_sha256_matches_artifact(trained: TrainedRepository, name: str) -> None:
    artifact = (trained.version_dir(name) / ARTIFACT_NAME).read_bytes()
    assert hashlib.sha256(artifact).hexdigest() == trained.manifests[name].sha256


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_train_demo_class_order_matches(trained: TrainedRepository, name: str) -> None:
    estimator = trained.load_estimator(name)
    class_names = trained.manifests[name].output.class_names
    assert [str(label) for label in estimator.classes_] == class_names


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_train_demo_library_versions(trained: TrainedRepository, name: str) -> None:
    versions = trained.manifests[name].library_versions
    for library in ("scikit-learn", "numpy", "networkx", "python"):
        assert versions.get(library)


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_train_demo_created_at_is_utc(trained: TrainedRepository, name: str) -> None:
    offset = trained.manifests[name].created_at.utcoffset()
    assert offset is not None
    assert offset.total_seconds() == 0


def test_train_demo_mutag_signature(trained: TrainedRepository) -> None:
    manifest = trained.manifests[MUTAG_MODEL]
    assert manifest.task == "graph"
    assert manifest.input.node_attributes == ["label"]
    assert manifest.input.feature_dim is None
    assert manifest.input.directed is False
    assert manifest.features.name == "wl_histogram"
    assert manifest.output.class_names == ["mutagenic", "non_mutagenic"]


def test_train_demo_cora_signature(trained: TrainedRepository) -> None:
    manifest = trained.manifests[CORA_MODEL]
    assert manifest.task == "node"
    assert manifest.input.feature_dim == 1433
    assert manifest.input.directed is False
    assert manifest.features.name == "sgc"
    assert len(manifest.output.class_names) == 7


def test_train_demo_mutag_cv_above_bar(trained: TrainedRepository) -> None:
    metric = trained.manifests[MUTAG_MODEL].metrics["cv_accuracy"]
    assert metric.value >= MUTAG_ACCURACY_BAR
    assert metric.std is not None
    assert "10-fold" in metric.protocol


def test_train_demo_mutag_holdout_recorded(trained: TrainedRepository) -> None:
    manifest = trained.manifests[MUTAG_MODEL]
    assert manifest.metrics["holdout_accuracy"].value >= MUTAG_ACCURACY_BAR
    assert manifest.training.seed == 0
    assert manifest.training.train_size == 150
    assert manifest.training.test_size == 38


def test_train_demo_mutag_holdout_reproduced(trained: TrainedRepository) -> None:
    manifest = trained.manifests[MUTAG_MODEL]
    estimator = trained.load_estimator(MUTAG_MODEL)
    _, test_records = mutag_holdout_split(load_mutag(), seed=0)
    correct = 0
    for record in test_records:
        request = PredictRequest.model_validate(mutag_request(record, f"mutag-{record['id']}"))
        row = extract(manifest.features, build_graph(request.graph), "graph", None)
        probabilities = estimator.predict_proba(row)[0]
        predicted = manifest.output.class_names[int(np.argmax(probabilities))]
        correct += predicted == ("mutagenic" if record["label"] == 1 else "non_mutagenic")
    assert correct / len(test_records) == pytest.approx(manifest.metrics["holdout_accuracy"].value)


def test_train_demo_cora_test_above_bar(trained: TrainedRepository) -> None:
    manifest = trained.manifests[CORA_MODEL]
    assert manifest.metrics["test_accuracy"].value >= CORA_TEST_BAR
    assert "ego-subgraph" in manifest.metrics["test_accuracy"].protocol
    assert manifest.training.train_size == 140
    assert manifest.training.test_size == 1000


def test_train_demo_leaves_no_staging(trained: TrainedRepository) -> None:
    assert staging_entries(trained.path) == []
    assert sorted(path.name for path in trained.path.iterdir()) == sorted(DEMO_MODELS)


def test_train_demo_reports_progress(trained: TrainedRepository) -> None:
    assert any("CV accuracy" in line for line in trained.progress)
    assert any("test accuracy" in line for line in trained.progress)
    assert sum("published version 1" in line for line in trained.progress) == len(DEMO_MODELS)


def test_train_demo_existing_versions_skipped(trained: TrainedRepository) -> None:
    before = {name: (trained.version_dir(name) / ARTIFACT_NAME).read_bytes() for name in trained.order}
    progress: list[str] = []
    again = train_demo(trained.path, seed=1, progress=progress.append)
    assert [manifest.name for manifest in again] == trained.order
    assert again == [trained.manifests[name] for name in trained.order]
    assert sum("skipped" in line for line in progress) == len(DEMO_MODELS)
    for name in trained.order:
        assert (trained.version_dir(name) / ARTIFACT_NAME).read_bytes() == before[name]


def test_train_demo_counts_models_done(trained: TrainedRepository) -> None:
    counts: list[tuple[int, int]] = []
    train_demo(trained.path, model_progress=lambda done, total: counts.append((done, total)))
    total = len(DEMO_MODELS)
    assert counts == [(done, total) for done in range(1, total + 1)]


def test_train_demo_existing_without_manifest(tmp_path: Path) -> None:
    (tmp_path / MUTAG_MODEL / "1").mkdir(parents=True)
    with pytest.raises(ModelRefused, match=MANIFEST_NAME):
        train_demo(tmp_path)


def test_publish_writes_version(tmp_path: Path) -> None:
    manifest = publish(tmp_path, 3, tiny_model())
    assert (tmp_path / "tiny" / "3" / ARTIFACT_NAME).is_file()
    assert manifest.version == 3
    assert manifest.output.class_names == ["high", "low"]
    assert staging_entries(tmp_path) == []


def test_publish_failure_removes_staging(tmp_path: Path) -> None:
    def fail_after_artifact(line: str) -> None:
        if f"wrote {ARTIFACT_NAME}" in line:
            raise RuntimeError("interrupted while publishing")

    with pytest.raises(RuntimeError, match="interrupted"):
        publish(tmp_path, 1, tiny_model(), progress=fail_after_artifact)
    assert staging_entries(tmp_path) == []
    assert not (tmp_path / "tiny" / "1").exists()


def test_publish_existing_version_kept(tmp_path: Path) -> None:
    first = publish(tmp_path, 1, tiny_model())
    artifact = (tmp_path / "tiny" / "1" / ARTIFACT_NAME).read_bytes()
    second = publish(tmp_path, 1, tiny_model())
    assert second == first
    assert (tmp_path / "tiny" / "1" / ARTIFACT_NAME).read_bytes() == artifact
    assert staging_entries(tmp_path) == []


# The models added beside mutag-wl and cora-sgc.


def test_train_demo_links_signature(trained: TrainedRepository) -> None:
    manifest = trained.manifests[LINK_MODEL]
    assert manifest.task == "edge"
    assert manifest.input.feature_dim == 1433
    assert manifest.input.directed is False
    assert manifest.output.kind == "score"
    assert manifest.output.positive_class == "link"
    assert manifest.features.name == "edge_concat"


def test_train_demo_fraud_signature(trained: TrainedRepository) -> None:
    manifest = trained.manifests[FRAUD_MODEL]
    assert manifest.task == "node"
    assert manifest.input.directed is True
    assert manifest.input.edge_attributes == ["rating"]
    assert manifest.input.feature_dim is None
    assert manifest.output.kind == "score"
    assert manifest.output.positive_class == "fraudulent"


def test_train_demo_karate_signature(trained: TrainedRepository) -> None:
    manifest = trained.manifests[KARATE_MODEL]
    assert manifest.task == "node"
    assert manifest.input.directed is False
    assert manifest.input.edge_attributes == ["weight"]
    assert manifest.input.node_attributes == []
    assert manifest.output.kind == "classes"
    assert manifest.output.class_names == ["Mr. Hi", "Officer"]


def test_train_demo_karate_never_reads_club(trained: TrainedRepository) -> None:
    features = json.dumps(trained.manifests[KARATE_MODEL].features.model_dump())
    assert "club" not in features


def test_train_demo_fraud_features_skip_incoming(trained: TrainedRepository) -> None:
    parts = trained.manifests[FRAUD_MODEL].features.params["parts"]
    direct = [part for part in parts if part["name"] == "edge_attribute_statistics"]
    means = [part for part in parts if part["name"] == "neighbor_mean"]
    assert [part["params"]["direction"] for part in direct] == ["out"]
    assert {part["params"]["direction"] for part in means} == {"out"}


def test_train_demo_links_auc_above_bar(trained: TrainedRepository) -> None:
    manifest = trained.manifests[LINK_MODEL]
    assert manifest.metrics["test_roc_auc"].value >= LINK_AUC_BAR
    assert manifest.training.test_size == 1054
    assert "without any held-out link" in manifest.metrics["test_roc_auc"].protocol


def test_train_demo_fraud_reports_both_variants(trained: TrainedRepository) -> None:
    metrics = trained.manifests[FRAUD_MODEL].metrics
    without = metrics["test_roc_auc_without_incoming_ratings"].value
    with_incoming = metrics["test_roc_auc_with_incoming_ratings"].value
    assert without >= FRAUD_AUC_BAR
    assert with_incoming >= LEAKING_FRAUD_AUC_BAR
    assert with_incoming > without
    assert metrics["cv_roc_auc_without_incoming_ratings"].std is not None
    assert (
        metrics["cv_roc_auc_with_incoming_ratings"].value
        > metrics["cv_roc_auc_without_incoming_ratings"].value
    )


def test_train_demo_fraud_split_recorded(trained: TrainedRepository) -> None:
    training = trained.manifests[FRAUD_MODEL].training
    assert training.seed == 0
    assert training.train_size == 221
    assert training.test_size == 95
    assert "stratified" in training.split


def test_train_demo_karate_accuracy_above_bar(trained: TrainedRepository) -> None:
    metrics = trained.manifests[KARATE_MODEL].metrics
    assert metrics["test_accuracy"].value >= KARATE_ACCURACY_BAR
    assert metrics["repeated_test_accuracy"].value >= KARATE_ACCURACY_BAR
    assert trained.manifests[KARATE_MODEL].training.test_size == 17


def test_train_demo_metrics_reproduced_elsewhere(trained: TrainedRepository) -> None:
    # Another process with another hash seed loads the published files and
    # scores the held-out wire requests through the serving engine.
    seed = "4177" if os.environ.get("PYTHONHASHSEED") != "4177" else "7714"
    environment = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [sys.executable, "-m", "graphinfer.models.reproduce", str(trained.path)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    reproduced = json.loads(completed.stdout)
    assert sorted(reproduced) == sorted(DEMO_MODELS)
    for name, metrics in reproduced.items():
        for metric, value in metrics.items():
            assert value == trained.manifests[name].metrics[metric].value, (name, metric)
