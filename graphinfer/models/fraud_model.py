"""The ``otc-fraud`` demo model: is a Bitcoin OTC user fraudulent, judged from their ego network?

The REV2 fraud labels were derived from ratings on the platform, and in this
data every fraudulent user has received at least one negative rating. A model
that reads the ratings a user received therefore mostly reads the label back.
Two variants are measured side by side on the same users:

- without incoming ratings (served): the request contains the user, the users
  they rated and the ratings among those, but no rating of the user; the
  features read only ratings the user gave and ratings the rated users got;
- with incoming ratings (measured, not served): the request also contains the
  users who rated the user and their ratings, and the features add the
  ratings the user received.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score

from graphinfer.models.evaluation import node_predictions, roc_auc, serve
from graphinfer.models.features import extract
from graphinfer.models.graph import build_graph
from graphinfer.models.manifest import FeatureSpec, InputSignature, Manifest, Metric, TrainingInfo
from graphinfer.models.publishing import Progress, TrainedModel, data_source, draft_manifest
from graphinfer.models.schema import PredictRequest
from graphinfer.models.social_datasets import (
    OTC_FILE,
    OTC_RATING,
    OtcData,
    load_otc,
    otc_ego_request,
    otc_user_split,
)

MODEL = "otc-fraud"
FRAUDULENT = "fraudulent"
TEST_FRACTION = 0.3
CV_FOLDS = 5
TREES = 300
MIN_SAMPLES_LEAF = 2


def _stats(direction: str) -> dict[str, Any]:
    return {
        "name": "edge_attribute_statistics",
        "version": 1,
        "params": {"attribute": OTC_RATING, "direction": direction},
    }


def _neighbour_mean(base: dict[str, Any], direction: str) -> dict[str, Any]:
    return {"name": "neighbor_mean", "version": 1, "params": {"base": base, "direction": direction}}


# Parameters are written out in full, so the manifest stays self-describing.
# No part reads an edge into the scored user: 'out' statistics read the
# ratings the user gave, and the neighbour means average over the users the
# user rated, reading the ratings those users received and gave.
FEATURES = FeatureSpec(
    name="node_concat",
    params={
        "parts": [
            _stats("out"),
            _neighbour_mean(_stats("in"), "out"),
            _neighbour_mean(_stats("out"), "out"),
        ]
    },
    version=1,
)
# The leaking variant adds the ratings the user received and how their raters rate.
FEATURES_WITH_INCOMING = FeatureSpec(
    name="node_concat",
    params={"parts": [*FEATURES.params["parts"], _stats("in"), _neighbour_mean(_stats("out"), "in")]},
    version=1,
)


def _estimator(seed: int) -> RandomForestClassifier:
    return RandomForestClassifier(
        n_estimators=TREES, min_samples_leaf=MIN_SAMPLES_LEAF, random_state=seed, n_jobs=1
    )


def _requests(otc: OtcData, users: list[int], incoming: bool) -> list[dict[str, Any]]:
    variant = "with" if incoming else "without"
    return [otc_ego_request(otc, user, f"{MODEL}-{variant}-{user}", incoming=incoming) for user in users]


def _features(spec: FeatureSpec, requests: list[dict[str, Any]]) -> np.ndarray:
    rows = []
    for request in requests:
        graph = build_graph(PredictRequest.model_validate(request).graph)
        rows.append(extract(spec, graph, "node", request["targets"]["nodes"]))
    return np.vstack(rows)


def train_otc_fraud(seed: int, progress: Progress) -> TrainedModel:
    """Fit both variants on the train users; serve the one without incoming ratings."""
    otc = load_otc()
    users = otc.labelled_users()
    train, test = otc_user_split(otc, seed=seed, test_fraction=TEST_FRACTION)
    labels = np.asarray([otc.labels[user] for user in users])
    position = {user: index for index, user in enumerate(users)}
    train_rows = [position[user] for user in train]

    fitted: dict[bool, TrainedModel] = {}
    cv_scores: dict[bool, np.ndarray] = {}
    test_auc: dict[bool, float] = {}
    for incoming in (False, True):
        spec = FEATURES_WITH_INCOMING if incoming else FEATURES
        features = _features(spec, _requests(otc, users, incoming))
        folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
        cv_scores[incoming] = cross_val_score(
            _estimator(seed), features, labels, cv=folds, scoring="roc_auc", n_jobs=1
        )
        estimator = _estimator(seed).fit(features[train_rows], labels[train_rows])
        fitted[incoming] = _trained(otc, estimator, spec, seed, train, test, incoming)
        test_auc[incoming] = _test_roc_auc(draft_manifest(fitted[incoming]), estimator, otc, test, incoming)
        progress(
            f"{MODEL}: {'with' if incoming else 'without'} incoming ratings, test ROC AUC "
            f"{test_auc[incoming]:.3f}, {CV_FOLDS}-fold CV {cv_scores[incoming].mean():.3f} "
            f"± {cv_scores[incoming].std():.3f}"
        )

    size = f"{len(test)} test users ({sum(otc.labels[u] == FRAUDULENT for u in test)} fraudulent)"
    metrics = {}
    for incoming, suffix in ((False, "without_incoming_ratings"), (True, "with_incoming_ratings")):
        served = "served model" if not incoming else "a second estimator, not served,"
        request_kind = "ego requests with" if incoming else "ego requests without"
        metrics[f"test_roc_auc_{suffix}"] = Metric(
            value=test_auc[incoming],
            protocol=(
                f"{served} on {size}, from {request_kind} the ratings the user received, "
                "through the serving engine"
            ),
        )
        metrics[f"cv_roc_auc_{suffix}"] = Metric(
            value=float(cv_scores[incoming].mean()),
            std=float(cv_scores[incoming].std()),
            protocol=(
                f"stratified {CV_FOLDS}-fold cross-validation over all {len(users)} labelled users "
                f"(seed {seed}), {request_kind} incoming ratings, a fresh estimator per fold"
            ),
        )
    return dataclasses.replace(fitted[False], metrics=metrics)


def _trained(
    otc: OtcData,
    estimator: RandomForestClassifier,
    spec: FeatureSpec,
    seed: int,
    train: list[int],
    test: list[int],
    incoming: bool,
) -> TrainedModel:
    sent = (
        "the user, everyone who rated the user or was rated by them, and every rating among them"
        if incoming
        else "the user, everyone the user rated, and every rating among them except ratings of the user"
    )
    return TrainedModel(
        name=MODEL,
        task="node",
        description=(
            "Probability that a Bitcoin OTC user is fraudulent (REV2 labels), from their ego "
            f"network of signed ratings. Send a directed graph of {sent}, each edge carrying "
            "'rating' from -10 to 10, with the user as the target. Features: statistics of the "
            "ratings the user gave, and the means over the users they rated of the ratings those "
            "users received and gave. No feature reads a rating of the user: the REV2 labels "
            "were derived from ratings on the platform, and in this data every fraudulent user "
            "has received a negative rating. test_roc_auc_with_incoming_ratings in the metrics "
            f"shows how much such ratings give away. Estimator: random forest ({TREES} trees)."
        ),
        estimator=estimator,
        input=InputSignature(task="node", directed=True, edge_attributes=[OTC_RATING]),
        features=spec,
        training=TrainingInfo(
            dataset=(
                f"Bitcoin OTC trust network, {len(otc.user_ids):,} users, REV2 labels of "
                f"{len(otc.labels)} users"
            ),
            source=data_source(OTC_FILE),
            split=(
                f"otc_user_split(seed={seed}, test_fraction={TEST_FRACTION}): labelled users "
                f"stratified by label, {len(train)} to fit and {len(test)} to test"
            ),
            seed=seed,
            train_size=len(train),
            test_size=len(test),
        ),
        metrics={},
        output_kind="score",
        positive_class=FRAUDULENT,
    )


def _test_roc_auc(manifest: Manifest, estimator: Any, otc: OtcData, test: list[int], incoming: bool) -> float:
    predictions = node_predictions(serve(manifest, estimator, _requests(otc, test, incoming)))
    return roc_auc([predictions[user]["score"] for user in test], [otc.labels[u] == FRAUDULENT for u in test])


def evaluate_otc_fraud(manifest: Manifest, estimator: Any) -> dict[str, float]:
    """Return the served model's test ROC AUC (without incoming ratings), through the engine."""
    seed = manifest.training.seed if manifest.training.seed is not None else 0
    otc = load_otc()
    _, test = otc_user_split(otc, seed=seed, test_fraction=TEST_FRACTION)
    return {"test_roc_auc_without_incoming_ratings": _test_roc_auc(manifest, estimator, otc, test, False)}
