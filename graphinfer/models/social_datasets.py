"""Loaders for the Bitcoin OTC trust network and Zachary's karate club, and v1 requests from them.

Bitcoin OTC is vendored in :mod:`graphinfer.datasets` (DATA.md gives its
source, citation and terms). The karate club ships inside networkx as
``networkx.karate_club_graph()``, so nothing is copied for it.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import networkx as nx
from sklearn.model_selection import train_test_split

from graphinfer.models.datasets import DATA_PACKAGE

OTC_FILE = "bitcoin_otc.json.gz"
OTC_CLASS_NAMES = ("benign", "fraudulent")
OTC_RATING = "rating"

KARATE_CLASS_NAMES = ("Mr. Hi", "Officer")
KARATE_WEIGHT = "weight"


@dataclass(frozen=True)
class OtcData:
    """The Bitcoin OTC rating network with the fraud labels of 316 users.

    ``ratings_out[u][v]`` is the rating u gave v, from -10 to 10 and never 0.
    Each ordered pair is rated at most once, and no user rates themselves.
    ``labels`` maps each labelled user to ``"benign"`` or ``"fraudulent"``.
    """

    user_ids: tuple[int, ...]
    labels: dict[int, str]
    ratings_out: dict[int, dict[int, int]]
    ratings_in: dict[int, dict[int, int]]

    def labelled_users(self) -> list[int]:
        """Return the labelled users in ascending id order."""
        return sorted(self.labels)


def load_otc() -> OtcData:
    """Read Bitcoin OTC: users, REV2 fraud labels and signed ratings."""
    with (
        resources.files(DATA_PACKAGE).joinpath(OTC_FILE).open("rb") as raw,
        gzip.open(raw, "rt", encoding="utf-8") as text,
    ):
        document = json.load(text)

    user_ids = tuple(int(node["id"]) for node in document["nodes"])
    labels = {int(node["id"]): node["label"] for node in document["nodes"] if node["label"] is not None}
    unknown = {label for label in labels.values() if label not in OTC_CLASS_NAMES}
    if unknown:
        raise ValueError(f"Bitcoin OTC has labels {sorted(unknown)}; expected {OTC_CLASS_NAMES}")
    ratings_out: dict[int, dict[int, int]] = {user: {} for user in user_ids}
    ratings_in: dict[int, dict[int, int]] = {user: {} for user in user_ids}
    for edge in document["edges"]:
        source, target, rating = int(edge["source"]), int(edge["target"]), int(edge["rating"])
        if target in ratings_out[source] or source == target:
            raise ValueError(f"Bitcoin OTC rating {source} -> {target} is repeated or a self-rating")
        ratings_out[source][target] = rating
        ratings_in[target][source] = rating
    return OtcData(user_ids=user_ids, labels=labels, ratings_out=ratings_out, ratings_in=ratings_in)


def otc_user_split(otc: OtcData, seed: int = 0, test_fraction: float = 0.3) -> tuple[list[int], list[int]]:
    """Split the labelled users into train and test parts, stratified by label; both sorted by id."""
    users = otc.labelled_users()
    train, test = train_test_split(
        users, test_size=test_fraction, random_state=seed, stratify=[otc.labels[user] for user in users]
    )
    return sorted(train), sorted(test)


def otc_ego_request(otc: OtcData, user: int, request_id: str, *, incoming: bool) -> dict[str, Any]:
    """Build the directed v1 node-task request that scores one user from their ego network.

    The graph contains the user, everyone the user rated and, when ``incoming``,
    everyone who rated the user, with every rating among these users as an
    edge carrying ``rating``. Without ``incoming`` no rating of the user is
    sent, not even one by a user they rated, so the request carries nothing
    of the ratings that the REV2 labels were derived from. Labels are not
    sent.
    """
    members = {user, *otc.ratings_out[user]}
    if incoming:
        members.update(otc.ratings_in[user])
    nodes = sorted(members)
    edges = [
        {"source": source, "target": target, OTC_RATING: rating}
        for source in nodes
        for target, rating in sorted(otc.ratings_out[source].items())
        if target in members and (incoming or target != user)
    ]
    return {
        "request_id": request_id,
        "graph": {
            "directed": True,
            "multigraph": False,
            "nodes": [{"id": node} for node in nodes],
            "edges": edges,
        },
        "task": "node",
        "targets": {"nodes": [user]},
    }


def karate_graph() -> nx.Graph:
    """Return networkx's karate club: 34 members, 78 weighted ties, ``club`` on every node."""
    return nx.karate_club_graph()


def karate_labels() -> dict[int, str]:
    """Return each member's club after the split, the class the karate model predicts."""
    return {int(node): data["club"] for node, data in karate_graph().nodes(data=True)}


def karate_split(seed: int = 0, test_fraction: float = 0.5) -> tuple[list[int], list[int]]:
    """Split the 34 members into train and test parts, stratified by club; both sorted by id."""
    labels = karate_labels()
    members = sorted(labels)
    train, test = train_test_split(
        members, test_size=test_fraction, random_state=seed, stratify=[labels[member] for member in members]
    )
    return sorted(train), sorted(test)


def karate_request(request_id: str, targets: list[int] | None = None) -> dict[str, Any]:
    """Build the undirected v1 node-task request holding the whole club.

    Edges carry networkx's ``weight`` (the number of contexts in which the two
    members interacted). The ``club`` attribute is the label, so it is left out.
    """
    graph = karate_graph()
    request: dict[str, Any] = {
        "request_id": request_id,
        "graph": {
            "directed": False,
            "multigraph": False,
            "nodes": [{"id": int(node)} for node in graph.nodes],
            "edges": [
                {"source": int(u), "target": int(v), KARATE_WEIGHT: data[KARATE_WEIGHT]}
                for u, v, data in graph.edges(data=True)
            ],
        },
        "task": "node",
    }
    if targets is not None:
        request["targets"] = {"nodes": [int(node) for node in targets]}
    return request
