"""The ``cora-links`` demo model: is there a citation between two Cora papers?

Held-out edges are removed from the graph the features are computed on, and
each is scored against a sampled pair of papers that do not cite each other
(see :func:`graphinfer.models.datasets.cora_link_split`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from graphinfer.models.datasets import CORA_FILE, cora_link_request, cora_link_split, load_cora
from graphinfer.models.evaluation import edge_scores, roc_auc, serve
from graphinfer.models.features import extract
from graphinfer.models.graph import build_graph
from graphinfer.models.manifest import FeatureSpec, InputSignature, Manifest, Metric, TrainingInfo
from graphinfer.models.publishing import Progress, TrainedModel, data_source, draft_manifest
from graphinfer.models.schema import PredictRequest

MODEL = "cora-links"
LINK = "link"
NO_LINK = "no_link"
TEST_FRACTION = 0.1
TRAIN_FRACTION = 0.1
MAX_ITER = 5000


def _spec(name: str, **params: Any) -> dict[str, Any]:
    return {"name": name, "version": 1, "params": params}


def _sgc(hops: int) -> dict[str, Any]:
    return _spec("sgc", hops=hops, concat=False, normalize_features=False, weight=None)


# Parameters are written out in full, so the manifest stays self-describing.
FEATURES = FeatureSpec(
    name="edge_concat",
    params={
        "parts": [
            _spec("common_neighbors"),
            _spec("jaccard"),
            _spec("adamic_adar"),
            _spec("resource_allocation"),
            _spec("preferential_attachment"),
            _spec("feature_similarity", base=_sgc(0), measure="cosine"),
            _spec("feature_similarity", base=_sgc(1), measure="cosine"),
            _spec("feature_similarity", base=_sgc(2), measure="cosine"),
        ]
    },
    version=1,
)


def _estimator() -> Pipeline:
    # Every feature is non-negative, and log1p tames the heavy tail of preferential attachment.
    return Pipeline(
        [
            ("log1p", FunctionTransformer(np.log1p)),
            ("scale", StandardScaler()),
            ("classify", LogisticRegression(max_iter=MAX_ITER)),
        ]
    )


def train_cora_links(seed: int, progress: Progress) -> TrainedModel:
    """Fit the Cora link classifier on the train pairs and measure ROC AUC on the test pairs."""
    cora = load_cora()
    split = cora_link_split(cora, seed=seed, test_fraction=TEST_FRACTION, train_fraction=TRAIN_FRACTION)
    request = cora_link_request(cora, split, split.train_pairs, f"{MODEL}-train")
    graph = build_graph(PredictRequest.model_validate(request).graph)
    features = extract(FEATURES, graph, "edge", list(split.train_pairs))
    estimator = _estimator().fit(features, [LINK if label else NO_LINK for label in split.train_labels])
    progress(f"{MODEL}: fitted on {len(split.train_pairs)} pairs, {features.shape[1]} features each")

    positives = sum(split.test_labels)
    trained = TrainedModel(
        name=MODEL,
        task="edge",
        description=(
            "Whether two Cora papers are linked by a citation, either way. Send the undirected "
            "citation graph with every paper's bag of words as sparse features of dimension "
            "1,433, and the pairs to score as targets.edges; a link already in the graph counts "
            "in its own features. Features: common neighbours, Jaccard, Adamic-Adar, resource "
            "allocation and preferential attachment on the graph, and the cosine similarity of "
            "the two papers' words and of their SGC propagations over 1 and 2 hops. Estimator: "
            "log1p, standard scaling and logistic regression. Score: probability of 'link'."
        ),
        estimator=estimator,
        input=InputSignature(task="edge", feature_dim=cora.feature_dim, directed=False),
        features=FEATURES,
        training=TrainingInfo(
            dataset="Cora (LINQS) citation graph, 2,708 papers, 5,278 undirected links",
            source=data_source(CORA_FILE),
            split=(
                f"cora_link_split(seed={seed}, test_fraction={TEST_FRACTION}, "
                f"train_fraction={TRAIN_FRACTION}): {positives} test and {positives} train links "
                f"removed from the graph, each part with as many sampled non-links; features on "
                f"the remaining {len(split.observed_edges)} links"
            ),
            seed=seed,
            train_size=len(split.train_pairs),
            test_size=len(split.test_pairs),
        ),
        metrics={},
        output_kind="score",
        positive_class=LINK,
    )
    metrics = evaluate_cora_links(draft_manifest(trained), estimator)
    progress(f"{MODEL}: test ROC AUC {metrics['test_roc_auc']:.3f} on {len(split.test_pairs)} pairs")
    return dataclasses.replace(
        trained,
        metrics={
            "test_roc_auc": Metric(
                value=metrics["test_roc_auc"],
                protocol=(
                    f"ROC AUC over {positives} held-out links and {positives} sampled non-links, "
                    "scored in one wire-format request holding the graph without any held-out "
                    "link, through the serving engine"
                ),
            )
        },
    )


def evaluate_cora_links(manifest: Manifest, estimator: Any) -> dict[str, float]:
    """Return ``test_roc_auc`` of the link model on its held-out pairs, through the engine."""
    seed = manifest.training.seed if manifest.training.seed is not None else 0
    cora = load_cora()
    split = cora_link_split(cora, seed=seed, test_fraction=TEST_FRACTION, train_fraction=TRAIN_FRACTION)
    request = cora_link_request(cora, split, split.test_pairs, f"{MODEL}-test")
    scores = edge_scores(serve(manifest, estimator, [request]))
    values = [scores[frozenset(pair)] for pair in split.test_pairs]
    return {"test_roc_auc": roc_auc(values, [label == 1 for label in split.test_labels])}
