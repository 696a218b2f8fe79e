"""Train the demo models ``mutag-wl`` and ``cora-sgc`` and publish them into a model repository.

Features are computed through the same path the service uses: a v1 request
dict, ``PredictRequest.model_validate``, ``build_graph`` and ``extract``, so
a model receives the same feature values in training as in serving.

Each version is written into a staging directory beside its final place and
renamed into place only when complete, so a scanner never finds half a model.
An existing version directory is never overwritten: :func:`train_demo` skips
that model and returns the manifest already there.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Sequence
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
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler

import graphinfer
from graphinfer.models.datasets import (
    CORA_FILE,
    DATA_PACKAGE,
    MUTAG_FILE,
    CoraData,
    cora_ego_request,
    cora_full_request,
    load_cora,
    load_mutag,
    mutag_class_name,
    mutag_holdout_split,
    mutag_request,
)
from graphinfer.models.features import extract
from graphinfer.models.graph import build_graph
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
from graphinfer.models.schema import PredictRequest

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

MUTAG_MODEL = "mutag-wl"
CORA_MODEL = "cora-sgc"
DEMO_VERSION = 1
STAGING_PREFIX = ".staging-"

# Parameters are written out in full, so a manifest stays self-describing
# even if a later release changes an extractor's defaults.
MUTAG_FEATURES = FeatureSpec(
    name="wl_histogram",
    params={"node_attribute": "label", "iterations": 3, "dim": 1024, "statistics": True},
    version=1,
)
CORA_FEATURES = FeatureSpec(
    name="sgc",
    params={"hops": 2, "concat": False, "normalize_features": False, "weight": None},
    version=1,
)
MUTAG_CV_FOLDS = 10
MUTAG_TEST_FRACTION = 0.2
MUTAG_C = 1.0
CORA_C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
MAX_ITER = 5000


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

    @property
    def class_names(self) -> list[str]:
        return [str(name) for name in self.estimator.classes_]


def train_demo(repository: Path, *, seed: int = 0, progress: Progress | None = None) -> list[Manifest]:
    """Train ``mutag-wl`` and ``cora-sgc`` as version 1 under ``repository``.

    Returns their manifests in that order. A model whose version directory
    already exists is not retrained: its manifest is read and returned as is,
    and :class:`graphinfer.models.repository.ModelRefused` is raised when that
    manifest is missing or invalid. ``progress`` receives one line per step.
    """
    report = progress or _ignore
    repository = Path(repository)
    trainers: Sequence[tuple[str, Callable[[int, Progress], TrainedModel]]] = (
        (MUTAG_MODEL, train_mutag),
        (CORA_MODEL, train_cora),
    )
    manifests = []
    for name, trainer in trainers:
        target = repository / name / str(DEMO_VERSION)
        if target.exists():
            manifests.append(_existing_manifest(target, report))
            continue
        trained = trainer(seed, report)
        manifests.append(publish(repository, DEMO_VERSION, trained, report))
    return manifests


def train_mutag(seed: int, progress: Progress) -> TrainedModel:
    """Fit the MUTAG graph classifier on the hold-out train part and measure it.

    ``cv_accuracy`` is stratified 10-fold cross-validation over all 188 graphs
    with a fresh estimator per fold. ``holdout_accuracy`` scores the served
    estimator, fitted on the train part only, on the test part of
    :func:`mutag_holdout_split`.
    """
    records = load_mutag()
    train_records, test_records = mutag_holdout_split(records, seed=seed, test_fraction=MUTAG_TEST_FRACTION)
    all_features = _mutag_features(records)
    all_labels = np.asarray([mutag_class_name(record) for record in records])
    progress(f"{MUTAG_MODEL}: features {all_features.shape[1]} wide for {len(records)} graphs")

    folds = StratifiedKFold(n_splits=MUTAG_CV_FOLDS, shuffle=True, random_state=seed)
    scores = cross_val_score(_mutag_estimator(), all_features, all_labels, cv=folds, n_jobs=1)
    progress(f"{MUTAG_MODEL}: {MUTAG_CV_FOLDS}-fold CV accuracy {scores.mean():.3f} ± {scores.std():.3f}")

    estimator = _mutag_estimator()
    estimator.fit(_mutag_features(train_records), [mutag_class_name(record) for record in train_records])
    holdout = float(
        estimator.score(_mutag_features(test_records), [mutag_class_name(record) for record in test_records])
    )
    progress(f"{MUTAG_MODEL}: hold-out accuracy {holdout:.3f} on {len(test_records)} graphs")

    split = (
        f"stratified hold-out (mutag_holdout_split, seed {seed}, test fraction "
        f"{MUTAG_TEST_FRACTION}): the served model is fitted on {len(train_records)} graphs and "
        f"scored on {len(test_records)}; cv_accuracy uses {MUTAG_CV_FOLDS} stratified folds "
        f"over all {len(records)} graphs"
    )
    return TrainedModel(
        name=MUTAG_MODEL,
        task="graph",
        description=(
            "Mutagenicity of a nitroaromatic compound (MUTAG). Nodes are atoms carrying the "
            "element symbol as 'label' (C, N, O, F, I, Cl, Br; hydrogens omitted). Features: "
            "hashed 3-round Weisfeiler-Lehman histogram plus size and degree statistics; "
            f"estimator: max-abs scaling and logistic regression (C={MUTAG_C})."
        ),
        estimator=estimator,
        input=InputSignature(task="graph", feature_dim=None, node_attributes=["label"], directed=False),
        features=MUTAG_FEATURES,
        training=TrainingInfo(
            dataset="MUTAG (TU Dortmund graph benchmarks), 188 graphs",
            source=_data_source(MUTAG_FILE),
            split=split,
            seed=seed,
            train_size=len(train_records),
            test_size=len(test_records),
        ),
        metrics={
            "cv_accuracy": Metric(
                value=float(scores.mean()),
                std=float(scores.std()),
                protocol=(
                    f"stratified {MUTAG_CV_FOLDS}-fold cross-validation on all {len(records)} "
                    f"graphs, shuffled with seed {seed}; mean and standard deviation over folds"
                ),
            ),
            "holdout_accuracy": Metric(
                value=holdout,
                protocol=(
                    f"served model on the {len(test_records)} test graphs of "
                    f"mutag_holdout_split(seed={seed}, test_fraction={MUTAG_TEST_FRACTION})"
                ),
            ),
        },
    )


def train_cora(seed: int, progress: Progress) -> TrainedModel:
    """Fit the Cora node classifier on the Planetoid split and measure it.

    The model is fitted on the 140 ``train`` nodes, with C chosen by accuracy
    on the 500 ``val`` nodes (the smallest C wins a tie). ``test_accuracy``
    scores the 1,000 ``test`` nodes, each from its own 2-hop ego-subgraph
    request, as the service receives them.
    """
    cora = load_cora()
    train_nodes = cora.split_nodes("train")
    val_nodes = cora.split_nodes("val")
    test_nodes = cora.split_nodes("test")

    # SGC with 2 hops gives a node the same row from the whole graph as from its
    # 2-hop ego subgraph, so one whole-graph request serves every train and val node.
    whole = build_graph(PredictRequest.model_validate(cora_full_request(cora, "cora-all")).graph)
    train_features = extract(CORA_FEATURES, whole, "node", [int(node) for node in train_nodes])
    val_features = extract(CORA_FEATURES, whole, "node", [int(node) for node in val_nodes])
    train_labels = _cora_class_names(cora, train_nodes)
    val_labels = _cora_class_names(cora, val_nodes)

    best: tuple[float, float, LogisticRegression] | None = None
    for c_value in CORA_C_GRID:
        candidate = LogisticRegression(C=c_value, max_iter=MAX_ITER)
        candidate.fit(train_features, train_labels)
        accuracy = float(candidate.score(val_features, val_labels))
        if best is None or accuracy > best[0]:
            best = (accuracy, c_value, candidate)
    assert best is not None
    val_accuracy, chosen_c, estimator = best
    progress(f"{CORA_MODEL}: C={chosen_c} chosen, validation accuracy {val_accuracy:.3f}")

    test_features = _cora_ego_features(cora, test_nodes)
    test_accuracy = float(estimator.score(test_features, _cora_class_names(cora, test_nodes)))
    progress(f"{CORA_MODEL}: test accuracy {test_accuracy:.3f} on {len(test_nodes)} ego-subgraph requests")

    return TrainedModel(
        name=CORA_MODEL,
        task="node",
        description=(
            "Subject of a Cora paper (7 classes) from its bag of words and its citation "
            "neighbourhood. Features: SGC propagation S^2 X with S = D^-1 (A + I) on the "
            "undirected graph; send at least the node's 2-hop neighbourhood for the trained "
            f"behaviour. Estimator: logistic regression, C={chosen_c} chosen on the validation "
            "nodes."
        ),
        estimator=estimator,
        input=InputSignature(task="node", feature_dim=cora.feature_dim, node_attributes=[], directed=False),
        features=CORA_FEATURES,
        training=TrainingInfo(
            dataset="Cora (LINQS) with the Planetoid split, 2,708 papers",
            source=_data_source(CORA_FILE),
            split=(
                f"Planetoid: fitted on {len(train_nodes)} train nodes, C chosen on "
                f"{len(val_nodes)} val nodes from {list(CORA_C_GRID)}, scored on "
                f"{len(test_nodes)} test nodes"
            ),
            seed=seed,
            train_size=len(train_nodes),
            test_size=len(test_nodes),
        ),
        metrics={
            "test_accuracy": Metric(
                value=test_accuracy,
                protocol=(
                    f"{len(test_nodes)} Planetoid test nodes, each scored from its own 2-hop "
                    "ego-subgraph request (cora_ego_request) through build_graph and extract"
                ),
            ),
            "val_accuracy": Metric(
                value=val_accuracy,
                protocol=f"{len(val_nodes)} Planetoid validation nodes, used to choose C",
            ),
        },
    )


def publish(
    repository: Path, version: int, trained: TrainedModel, progress: Progress | None = None
) -> Manifest:
    """Write ``trained`` as ``repository/NAME/VERSION`` through a staging directory.

    The artifact and manifest go into ``NAME/.staging-VERSION-*`` first, which
    is renamed to ``NAME/VERSION`` once both are on disk. The staging
    directory is removed on any failure. When the version directory appears
    meanwhile, the staging copy is dropped and the existing manifest returned.
    """
    report = progress or _ignore
    model_dir = Path(repository) / trained.name
    target = model_dir / str(version)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=model_dir))
    try:
        # mkdtemp creates the directory with mode 0700, but workers that run as
        # another user must be able to read the published version.
        os.chmod(staging, 0o755)
        artifact = _serialise(trained.estimator)
        _write_file(staging / ARTIFACT_NAME, artifact)
        digest = hashlib.sha256(artifact).hexdigest()
        report(f"{trained.name}: wrote {ARTIFACT_NAME}, {len(artifact)} bytes, sha256 {digest}")

        manifest = Manifest(
            name=trained.name,
            version=version,
            task=trained.task,
            description=trained.description,
            input=trained.input,
            features=trained.features,
            output=OutputSpec(kind="classes", class_names=trained.class_names),
            artifact=ARTIFACT_NAME,
            sha256=digest,
            training=trained.training,
            metrics=trained.metrics,
            library_versions=library_versions(),
            created_at=datetime.now(UTC),
        )
        _write_file(staging / MANIFEST_NAME, (manifest.model_dump_json(indent=2) + "\n").encode())
        _fsync_directory(staging)

        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return _existing_manifest(target, report)
        _fsync_directory(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info("published model=%s version=%s path=%s sha256=%s", manifest.name, version, target, digest)
    report(f"{trained.name}: published version {version} at {target}")
    return manifest


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


def _ignore(message: str) -> None:
    """Discard a progress line when the caller passed no ``progress``."""


def _existing_manifest(target: Path, progress: Progress) -> Manifest:
    manifest = read_manifest(target)
    logger.info("model version exists, not retrained model=%s path=%s", manifest.name, target)
    progress(f"{manifest.name}: version {manifest.version} already exists at {target}; skipped")
    return manifest


def _mutag_estimator() -> Pipeline:
    # Max-abs scaling keeps the histogram counts non-negative and sparse-friendly.
    # It also scored higher in cross-validation than log1p with standardisation.
    return Pipeline(
        [
            ("scale", MaxAbsScaler()),
            ("classify", LogisticRegression(C=MUTAG_C, max_iter=MAX_ITER)),
        ]
    )


def _mutag_features(records: Sequence[dict[str, Any]]) -> np.ndarray:
    rows = []
    for record in records:
        request = PredictRequest.model_validate(mutag_request(record, f"mutag-{record['id']}"))
        rows.append(extract(MUTAG_FEATURES, build_graph(request.graph), "graph", None))
    return np.vstack(rows)


def _cora_class_names(cora: CoraData, nodes: np.ndarray) -> np.ndarray:
    return np.asarray([cora.class_name(int(node)) for node in nodes])


def _cora_ego_features(cora: CoraData, nodes: np.ndarray) -> np.ndarray:
    rows = []
    for node in nodes:
        request = PredictRequest.model_validate(
            cora_ego_request(cora, int(node), f"cora-{int(node)}", hops=CORA_FEATURES.params["hops"])
        )
        targets = request.targets.nodes if request.targets and request.targets.nodes else None
        rows.append(extract(CORA_FEATURES, build_graph(request.graph), "node", targets))
    return np.vstack(rows)


def _data_source(file_name: str) -> str:
    data = resources.files(DATA_PACKAGE).joinpath(file_name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return f"{DATA_PACKAGE.replace('.', '/')}/{file_name} (sha256 {digest}); see DATA.md"


def _serialise(estimator: Any) -> bytes:
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
