"""Train the demo models and publish them into a model repository.

The demo models are ``mutag-wl`` (graph task), ``cora-sgc`` and
``cora-links`` (node and edge tasks on Cora), ``otc-fraud`` (node task on
Bitcoin OTC) and ``karate-club`` (node task on Zachary's karate club). This
module trains the first two; the others are trained in
:mod:`graphinfer.models.link_model`, :mod:`graphinfer.models.fraud_model` and
:mod:`graphinfer.models.karate_model`.

Features are computed through the same path the service uses: a v1 request
dict, ``PredictRequest.model_validate``, ``build_graph`` and ``extract``, so
a model receives the same feature values in training as in serving.
Publishing (see :mod:`graphinfer.models.publishing`) never overwrites an
existing version: :func:`train_demo` skips that model and returns the
manifest already there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler

from graphinfer.models import fraud_model, karate_model, link_model
from graphinfer.models.datasets import (
    CORA_FILE,
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
from graphinfer.models.evaluation import accuracy, node_predictions, serve
from graphinfer.models.features import extract
from graphinfer.models.graph import build_graph
from graphinfer.models.manifest import FeatureSpec, InputSignature, Manifest, Metric, TrainingInfo
from graphinfer.models.publishing import (
    DEMO_VERSION,
    STAGING_PREFIX,
    Progress,
    TrainedModel,
    data_source,
    existing_manifest,
    ignore_progress,
    library_versions,
    publish,
)
from graphinfer.models.repository import load_estimator, scan
from graphinfer.models.schema import PredictRequest

__all__ = [
    "CORA_MODEL",
    "DEMO_MODELS",
    "DEMO_VERSION",
    "MUTAG_MODEL",
    "STAGING_PREFIX",
    "TrainedModel",
    "library_versions",
    "publish",
    "reproduce_metrics",
    "train_demo",
]

MUTAG_MODEL = "mutag-wl"
CORA_MODEL = "cora-sgc"

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


def train_demo(
    repository: Path,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    model_progress: Callable[[int, int], None] | None = None,
) -> list[Manifest]:
    """Train the demo models as version 1 under ``repository``.

    Returns their manifests in the order of :data:`DEMO_MODELS`. A model
    whose version directory already exists is not retrained: its manifest is
    read and returned as is, and
    :class:`graphinfer.models.repository.ModelRefused` is raised when that
    manifest is missing or invalid. ``progress`` receives one line per step.
    ``model_progress`` receives the number of models done and the number of
    demo models after each model, whether trained or skipped.
    """
    report = progress or ignore_progress
    repository = Path(repository)
    manifests = []
    for name, trainer in TRAINERS.items():
        target = repository / name / str(DEMO_VERSION)
        if target.exists():
            manifests.append(existing_manifest(target, report))
        else:
            trained = trainer(seed, report)
            manifests.append(publish(repository, DEMO_VERSION, trained, report))
        if model_progress is not None:
            model_progress(len(manifests), len(TRAINERS))
    return manifests


def reproduce_metrics(repository: Path) -> dict[str, dict[str, float]]:
    """Recompute the held-out metrics of the demo models served from ``repository``.

    Each model's estimator is loaded as a pool process loads it
    (:func:`graphinfer.models.repository.load_estimator`) and scored on its
    held-out requests through :func:`graphinfer.models.evaluation.serve`,
    with the split seed recorded in its manifest. Returns the metrics by
    model name; a metric that needs retraining, such as cross-validation, is
    not included.
    """
    catalog = scan(Path(repository))
    metrics = {}
    for entry in catalog.serving():
        evaluator = EVALUATORS.get(entry.name)
        if evaluator is not None:
            estimator = load_estimator(entry, frozenset())
            metrics[entry.name] = evaluator(entry.manifest, estimator)
    return metrics


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
            source=data_source(MUTAG_FILE),
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
            source=data_source(CORA_FILE),
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


def evaluate_mutag(manifest: Manifest, estimator: Any) -> dict[str, float]:
    """Return ``holdout_accuracy`` of ``mutag-wl`` on its held-out graphs, through the engine."""
    seed = _recorded_seed(manifest)
    _, test_records = mutag_holdout_split(load_mutag(), seed=seed, test_fraction=MUTAG_TEST_FRACTION)
    requests = [mutag_request(record, f"mutag-{record['id']}") for record in test_records]
    outputs = serve(manifest, estimator, requests)
    predicted = [output["label"] for output in outputs]
    return {"holdout_accuracy": accuracy(predicted, [mutag_class_name(record) for record in test_records])}


def evaluate_cora(manifest: Manifest, estimator: Any) -> dict[str, float]:
    """Return ``test_accuracy`` of ``cora-sgc`` on the Planetoid test nodes, through the engine."""
    cora = load_cora()
    test_nodes = [int(node) for node in cora.split_nodes("test")]
    hops = manifest.features.params["hops"]
    requests = [cora_ego_request(cora, node, f"cora-{node}", hops=hops) for node in test_nodes]
    predictions = node_predictions(serve(manifest, estimator, requests))
    predicted = [predictions[node]["label"] for node in test_nodes]
    return {"test_accuracy": accuracy(predicted, [cora.class_name(node) for node in test_nodes])}


def _recorded_seed(manifest: Manifest) -> int:
    return manifest.training.seed if manifest.training.seed is not None else 0


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


Trainer = Callable[[int, Progress], TrainedModel]
Evaluator = Callable[[Manifest, Any], dict[str, float]]

#: The demo models in training order, each with its trainer.
TRAINERS: Mapping[str, Trainer] = {
    MUTAG_MODEL: train_mutag,
    CORA_MODEL: train_cora,
    link_model.MODEL: link_model.train_cora_links,
    fraud_model.MODEL: fraud_model.train_otc_fraud,
    karate_model.MODEL: karate_model.train_karate,
}
DEMO_MODELS: Sequence[str] = tuple(TRAINERS)

#: The function that recomputes each demo model's held-out metrics from its published files.
EVALUATORS: Mapping[str, Evaluator] = {
    MUTAG_MODEL: evaluate_mutag,
    CORA_MODEL: evaluate_cora,
    link_model.MODEL: link_model.evaluate_cora_links,
    fraud_model.MODEL: fraud_model.evaluate_otc_fraud,
    karate_model.MODEL: karate_model.evaluate_karate,
}
