"""Implicit model selection across the demo models: each data set's requests fit only their model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from graphinfer.errors import GraphinferError
from graphinfer.models import datasets, social_datasets
from graphinfer.models.decode import DecodedRequest, Limits, decode_request
from graphinfer.models.engine import misfit_reason, select_models
from graphinfer.models.repository import ModelCatalog, scan

ALL_MODELS = ["cora-links", "cora-sgc", "karate-club", "mutag-wl", "otc-fraud"]


@pytest.fixture(scope="module")
def catalog(model_repository: Path) -> ModelCatalog:
    return scan(model_repository)


@pytest.fixture(scope="module")
def cora() -> datasets.CoraData:
    return datasets.load_cora()


def decode(request: dict[str, Any]) -> DecodedRequest:
    return decode_request(json.dumps(request).encode(), Limits())


def selected(catalog: ModelCatalog, request: dict[str, Any]) -> tuple[list[str], list[str]]:
    decoded = decode(request)
    selection = select_models(decoded.request, decoded.graph, catalog)
    return [entry.name for entry in selection.run], [item["model"] for item in selection.skipped]


def test_catalog_serves_every_demo_model(catalog: ModelCatalog) -> None:
    assert [entry.name for entry in catalog.serving()] == ALL_MODELS


def test_cora_ego_request_selects_only_cora_sgc(catalog: ModelCatalog, cora: datasets.CoraData) -> None:
    node = int(cora.split_nodes("test")[0])
    run, skipped = selected(catalog, datasets.cora_ego_request(cora, node, "r1"))
    assert run == ["cora-sgc"]
    assert skipped == ["karate-club", "otc-fraud"]


def test_cora_link_request_selects_only_links(catalog: ModelCatalog, cora: datasets.CoraData) -> None:
    split = datasets.cora_link_split(cora)
    run, skipped = selected(catalog, datasets.cora_link_request(cora, split, split.test_pairs[:3], "r2"))
    assert run == ["cora-links"]
    assert skipped == []


def test_otc_request_selects_only_fraud(catalog: ModelCatalog) -> None:
    otc = social_datasets.load_otc()
    user = otc.labelled_users()[0]
    run, skipped = selected(catalog, social_datasets.otc_ego_request(otc, user, "r3", incoming=False))
    assert run == ["otc-fraud"]
    assert skipped == ["cora-sgc", "karate-club"]


def test_karate_request_selects_only_karate(catalog: ModelCatalog) -> None:
    run, skipped = selected(catalog, social_datasets.karate_request("r4", [0, 33]))
    assert run == ["karate-club"]
    assert skipped == ["cora-sgc", "otc-fraud"]


def test_mutag_request_without_task_skips_others(catalog: ModelCatalog) -> None:
    request = datasets.mutag_request(datasets.load_mutag()[0], "r5")
    del request["task"]
    run, skipped = selected(catalog, request)
    assert run == ["mutag-wl"]
    assert skipped == ["cora-links", "cora-sgc", "karate-club", "otc-fraud"]


def test_misfit_names_missing_edge_attribute(catalog: ModelCatalog) -> None:
    request = social_datasets.karate_request("r6")
    del request["graph"]["edges"][5]["weight"]
    decoded = decode(request)
    reason = misfit_reason(catalog.resolve("karate-club").manifest, decoded.graph, "node")
    assert reason is not None
    assert "edge attribute 'weight'" in reason
    assert "1 of this graph's edges" in reason


def test_named_misfit_model_is_error_result(catalog: ModelCatalog) -> None:
    request = social_datasets.karate_request("r7")
    request["models"] = ["karate-club", "otc-fraud"]
    decoded = decode(request)
    selection = select_models(decoded.request, decoded.graph, catalog)
    assert [entry.name for entry in selection.run] == ["karate-club"]
    assert [error["error"]["code"] for error in selection.errors] == ["incompatible_input"]


def test_node_request_fitting_none_rejected(catalog: ModelCatalog) -> None:
    request = {
        "request_id": "r8",
        "graph": {"directed": True, "nodes": [{"id": 1}, {"id": 2}], "edges": [{"source": 1, "target": 2}]},
        "task": "node",
    }
    decoded = decode(request)
    with pytest.raises(GraphinferError) as caught:
        select_models(decoded.request, decoded.graph, catalog)
    assert caught.value.code == "no_model_selected"
