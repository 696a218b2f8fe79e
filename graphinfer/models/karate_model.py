"""The ``karate-club`` demo model: which club did a karate club member join after the split?

The ``club`` node attribute is the label, so requests never carry it and the
features come from the weighted structure alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from graphinfer.models.evaluation import accuracy, node_predictions, serve
from graphinfer.models.features import extract
from graphinfer.models.graph import build_graph
from graphinfer.models.manifest import FeatureSpec, InputSignature, Manifest, Metric, TrainingInfo
from graphinfer.models.publishing import Progress, TrainedModel, draft_manifest
from graphinfer.models.schema import PredictRequest
from graphinfer.models.social_datasets import KARATE_WEIGHT, karate_labels, karate_request, karate_split

MODEL = "karate-club"
TEST_FRACTION = 0.5
REPEATED_SPLITS = 20
MAX_ITER = 5000

_ANCHORS = {
    "name": "anchor_pagerank",
    "version": 1,
    "params": {"anchors": 2, "alpha": 0.85, "weight": KARATE_WEIGHT},
}
# Parameters are written out in full, so the manifest stays self-describing.
FEATURES = FeatureSpec(
    name="node_concat",
    params={
        "parts": [
            {"name": "degree", "version": 1, "params": {"direction": "any", "weight": KARATE_WEIGHT}},
            _ANCHORS,
            {"name": "neighbor_mean", "version": 1, "params": {"base": _ANCHORS, "direction": "any"}},
        ]
    },
    version=1,
)


def _estimator() -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("classify", LogisticRegression(max_iter=MAX_ITER))])


def train_karate(seed: int, progress: Progress) -> TrainedModel:
    """Fit the club classifier on half the members and measure accuracy on the other half.

    ``test_accuracy`` scores the served estimator. ``repeated_test_accuracy``
    is the mean and standard deviation over ``REPEATED_SPLITS`` stratified
    splits (seeds ``seed`` to ``seed + REPEATED_SPLITS - 1``) with a fresh
    estimator each, because 17 test members make one split's accuracy coarse.
    """
    labels = karate_labels()
    train, test = karate_split(seed=seed, test_fraction=TEST_FRACTION)
    graph = build_graph(PredictRequest.model_validate(karate_request(f"{MODEL}-train")).graph)
    members = sorted(labels)
    features = extract(FEATURES, graph, "node", members)
    row = {member: position for position, member in enumerate(members)}

    def fit(part: list[int]) -> Pipeline:
        return _estimator().fit(features[[row[m] for m in part]], [labels[m] for m in part])

    estimator = fit(train)
    repeated = []
    for split_seed in range(seed, seed + REPEATED_SPLITS):
        split_train, split_test = karate_split(seed=split_seed, test_fraction=TEST_FRACTION)
        score = fit(split_train).score(
            features[[row[m] for m in split_test]], [labels[m] for m in split_test]
        )
        repeated.append(float(score))
    progress(f"{MODEL}: fitted on {len(train)} members, {features.shape[1]} features each")

    trained = TrainedModel(
        name=MODEL,
        task="node",
        description=(
            "Which club a member of Zachary's karate club joined after the split ('Mr. Hi' or "
            "'Officer'). Send the undirected club graph with the interaction count of each tie as "
            "edge 'weight'; the 'club' attribute is the label and is not read. Features from "
            "structure only: weighted degree, personalised PageRank from the two highest-degree "
            "members (the two leaders) and its mean over neighbours. Estimator: standard scaling "
            "and logistic regression."
        ),
        estimator=estimator,
        input=InputSignature(task="node", directed=False, edge_attributes=[KARATE_WEIGHT]),
        features=FEATURES,
        training=TrainingInfo(
            dataset="Zachary's karate club (networkx.karate_club_graph), 34 members, 78 ties",
            source="networkx.karate_club_graph(); see DATA.md",
            split=(
                f"karate_split(seed={seed}, test_fraction={TEST_FRACTION}): stratified by club, "
                f"{len(train)} members to fit and {len(test)} to test"
            ),
            seed=seed,
            train_size=len(train),
            test_size=len(test),
        ),
        metrics={},
    )
    test_accuracy = evaluate_karate(draft_manifest(trained), estimator)["test_accuracy"]
    progress(
        f"{MODEL}: test accuracy {test_accuracy:.3f} on {len(test)} members; "
        f"{REPEATED_SPLITS} splits {np.mean(repeated):.3f} ± {np.std(repeated):.3f}"
    )
    return dataclasses.replace(
        trained,
        metrics={
            "test_accuracy": Metric(
                value=test_accuracy,
                protocol=(
                    f"served model on the {len(test)} test members, scored in one wire-format "
                    "request of the whole club through the serving engine"
                ),
            ),
            "repeated_test_accuracy": Metric(
                value=float(np.mean(repeated)),
                std=float(np.std(repeated)),
                protocol=(
                    f"mean and standard deviation over {REPEATED_SPLITS} stratified half splits "
                    f"(seeds {seed} to {seed + REPEATED_SPLITS - 1}), a fresh estimator per split"
                ),
            ),
        },
    )


def evaluate_karate(manifest: Manifest, estimator: Any) -> dict[str, float]:
    """Return ``test_accuracy`` of the club model on its test members, through the engine."""
    seed = manifest.training.seed if manifest.training.seed is not None else 0
    labels = karate_labels()
    _, test = karate_split(seed=seed, test_fraction=TEST_FRACTION)
    predictions = node_predictions(serve(manifest, estimator, [karate_request(f"{MODEL}-test", test)]))
    return {"test_accuracy": accuracy([predictions[m]["label"] for m in test], [labels[m] for m in test])}
