"""Whatever arrives on the request topic: bad input is dead-lettered, awkward graphs are answered.

One worker serves this module, with small caps so oversized graphs are
cheap to build. Its repository holds ``structure`` (a graph-task model on
the WL histogram of the node attribute ``label``) and ``node-sgc`` (a
node-task model on propagated 2-dimensional node features); both accept
directed and undirected graphs, multigraphs and self-loops.
"""

from __future__ import annotations

import json
import re
import string
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import WorkerProcess, launch_worker, private_environment, stop_worker
from tests.kafka_client import KafkaTestClient
from tests.reliability_support import (
    Ledger,
    Sent,
    log_lines,
    report,
    wait_for_replies,
    wait_for_terminal,
    write_structure_models,
)

pytestmark = pytest.mark.integration

MAX_NODES = 50
MAX_EDGES = 100
MAX_MESSAGE_BYTES = 20_000
MODELS = ["structure", "node-sgc"]


@pytest.fixture(scope="module")
def input_worker(
    worker_environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    repository = write_structure_models(tmp_path_factory.mktemp("structure-models"))
    environment = private_environment(
        worker_environment,
        f"input{uuid.uuid4().hex[:8]}",
        GRAPHINFER_MODEL_REPOSITORY=str(repository),
        GRAPHINFER_MAX_NODES=str(MAX_NODES),
        GRAPHINFER_MAX_EDGES=str(MAX_EDGES),
        GRAPHINFER_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
    )
    started = launch_worker(environment, tmp_path_factory.mktemp("input-worker") / "worker.log")
    yield started
    if started.process.poll() is None:
        stop_worker(started)


@pytest.fixture(scope="module")
async def input_kafka(input_worker: WorkerProcess) -> AsyncIterator[KafkaTestClient]:
    client = KafkaTestClient(input_worker.environment)
    await client.start()
    yield client
    await client.stop()


def valid_request(request_id: str, *, directed: bool = False, multigraph: bool = False) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "graph": {
            "directed": directed,
            "multigraph": multigraph,
            "nodes": [
                {"id": "a", "label": "C", "features": [0.5, 1.0]},
                {"id": "b", "label": "N", "features": [1.5, 0.0]},
                {"id": "c", "label": "O", "features": [0.0, 2.0]},
            ],
            "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}],
        },
        "models": list(MODELS),
    }


def _with(request: dict[str, Any], **changes: Any) -> dict[str, Any]:
    changed = json.loads(json.dumps(request))
    changed.update(changes)
    return changed


def _graph_with(request: dict[str, Any], **changes: Any) -> dict[str, Any]:
    changed = json.loads(json.dumps(request))
    changed["graph"].update(changes)
    return changed


@dataclass
class BadCase:
    kind: str
    code: str
    value: bytes | None
    key: str | None
    recoverable: bool
    headers: list[tuple[str, bytes]] | None = None


def bad_cases(prefix: str) -> list[BadCase]:
    """One message per bad-input class, with the code it must be rejected with."""

    def rid(kind: str) -> str:
        return f"{prefix}-{kind}"

    def encoded(document: Any) -> bytes:
        return json.dumps(document).encode()

    base = valid_request
    nodes = base("x")["graph"]["nodes"]
    many_nodes = [{"id": index, "label": "C", "features": [0.0, 1.0]} for index in range(MAX_NODES + 1)]
    many_edges = [{"source": "a", "target": "b"}] * (MAX_EDGES + 1)
    cases = [
        BadCase("not_utf8", "invalid_encoding", b'{"request_id": "\xff\xfe"}', rid("not_utf8"), False),
        BadCase("not_json", "invalid_json", b"hello, graph", rid("not_json"), False),
        BadCase(
            "nan_literal",
            "invalid_json",
            encoded(base(rid("nan_literal"))).replace(b"0.5", b"NaN"),
            rid("nan_literal"),
            False,
        ),
        BadCase(
            "infinity_literal",
            "invalid_json",
            encoded(base(rid("infinity_literal"))).replace(b"0.5", b"Infinity"),
            rid("infinity_literal"),
            False,
        ),
        BadCase(
            "duplicate_keys",
            "invalid_json",
            b'{"request_id": "%s", "task": "graph", "task": "node"}' % rid("duplicate_keys").encode(),
            rid("duplicate_keys"),
            False,
        ),
        BadCase("array_value", "invalid_request", b"[1, 2, 3]", rid("array_value"), False),
        BadCase(
            "graph_not_object",
            "invalid_graph",
            encoded(_with(base(rid("graph_not_object")), graph=["a", "b"])),
            rid("graph_not_object"),
            True,
        ),
        BadCase(
            "unknown_field",
            "invalid_request",
            encoded(_with(base(rid("unknown_field")), priority="high")),
            rid("unknown_field"),
            True,
        ),
        BadCase(
            "missing_request_id",
            "invalid_request",
            encoded({key: value for key, value in base("x").items() if key != "request_id"}),
            rid("missing_request_id"),
            False,
        ),
        BadCase(
            "malformed_request_id",
            "invalid_request",
            encoded(base("not a valid id!")),
            rid("malformed_request_id"),
            False,
        ),
        BadCase(
            "key_differs",
            "invalid_request",
            encoded(base(rid("key_differs"))),
            "another-key",
            True,
        ),
        BadCase(
            "edge_to_missing_node",
            "invalid_graph",
            encoded(
                _graph_with(base(rid("edge_to_missing_node")), edges=[{"source": "a", "target": "ghost"}])
            ),
            rid("edge_to_missing_node"),
            True,
        ),
        BadCase(
            "duplicate_node_ids",
            "invalid_graph",
            encoded(_graph_with(base(rid("duplicate_node_ids")), nodes=[*nodes, nodes[0]])),
            rid("duplicate_node_ids"),
            True,
        ),
        BadCase(
            "boolean_id",
            "invalid_graph",
            encoded(_graph_with(base(rid("boolean_id")), nodes=[*nodes, {**nodes[0], "id": True}])),
            rid("boolean_id"),
            True,
        ),
        BadCase(
            "float_id",
            "invalid_graph",
            encoded(_graph_with(base(rid("float_id")), nodes=[*nodes, {**nodes[0], "id": 1.5}])),
            rid("float_id"),
            True,
        ),
        BadCase(
            "colliding_ids",
            "invalid_graph",
            encoded(
                _graph_with(
                    base(rid("colliding_ids")),
                    nodes=[{**nodes[0], "id": 1}, {**nodes[1], "id": "1"}],
                    edges=[],
                )
            ),
            rid("colliding_ids"),
            True,
        ),
        BadCase(
            "non_finite_feature",
            "invalid_graph",
            encoded(base(rid("non_finite_feature"))).replace(b"0.5", b"1e400"),
            rid("non_finite_feature"),
            True,
        ),
        BadCase(
            "ragged_features",
            "invalid_graph",
            encoded(
                _graph_with(
                    base(rid("ragged_features")), nodes=[*nodes, {"id": "d", "label": "C", "features": [1.0]}]
                )
            ),
            rid("ragged_features"),
            True,
        ),
        BadCase(
            "too_many_nodes",
            "graph_too_large",
            encoded(_graph_with(base(rid("too_many_nodes")), nodes=many_nodes, edges=[])),
            rid("too_many_nodes"),
            True,
        ),
        BadCase(
            "too_many_edges",
            "graph_too_large",
            encoded(_graph_with(base(rid("too_many_edges")), edges=many_edges)),
            rid("too_many_edges"),
            True,
        ),
        BadCase(
            "too_many_bytes",
            "message_too_large",
            encoded(_with(base(rid("too_many_bytes")), metadata={"padding": "x" * MAX_MESSAGE_BYTES})),
            rid("too_many_bytes"),
            False,
        ),
        BadCase(
            "unknown_model",
            "unknown_model",
            encoded(_with(base(rid("unknown_model")), models=["no-such-model"])),
            rid("unknown_model"),
            True,
        ),
        BadCase(
            "unknown_task",
            "unknown_task",
            encoded(_with(base(rid("unknown_task")), task="cluster")),
            rid("unknown_task"),
            True,
        ),
        BadCase(
            "unsupported_schema",
            "unsupported_schema",
            encoded(base(rid("unsupported_schema"))),
            rid("unsupported_schema"),
            True,
            headers=[("graphinfer-schema", b"2")],
        ),
        BadCase(
            "targets_not_in_graph",
            "invalid_targets",
            encoded(_with(base(rid("targets_not_in_graph")), targets={"nodes": ["a", "ghost"]})),
            rid("targets_not_in_graph"),
            True,
        ),
        BadCase("tombstone", "invalid_request", None, rid("tombstone"), False),
        BadCase(
            "nul_character",
            "invalid_request",
            encoded(_with(base(rid("nul_character")), metadata={"tenant": "t\u0000"})),
            rid("nul_character"),
            True,
        ),
    ]
    return cases


def awkward_requests(prefix: str) -> dict[str, dict[str, Any]]:
    """Valid graphs that networkx or a feature extractor could trip on; each must be answered."""
    nodes = valid_request("x")["graph"]["nodes"]
    requests = {
        "isolated_nodes": _graph_with(
            valid_request(""),
            nodes=[*nodes, {"id": "lone", "label": "C", "features": [1.0, 1.0]}],
        ),
        "self_loops": _graph_with(
            valid_request(""), edges=[{"source": "a", "target": "a"}, {"source": "b", "target": "c"}]
        ),
        "multigraph": _graph_with(
            valid_request("", multigraph=True),
            edges=[
                {"source": "a", "target": "b"},
                {"source": "a", "target": "b"},
                {"source": "b", "target": "c"},
            ],
        ),
        "directed": valid_request("", directed=True),
        "directed_multigraph_with_loop": _graph_with(
            valid_request("", directed=True, multigraph=True),
            edges=[
                {"source": "b", "target": "a"},
                {"source": "b", "target": "a"},
                {"source": "c", "target": "c"},
            ],
        ),
        "one_node": _graph_with(valid_request(""), nodes=[nodes[0]], edges=[]),
        "mixed_id_types": _graph_with(
            valid_request(""),
            nodes=[{**nodes[0], "id": "a"}, {**nodes[1], "id": 1}, {**nodes[2], "id": 22}],
            edges=[{"source": "a", "target": 1}, {"source": 1, "target": 22}],
        ),
        "links_key": {
            **valid_request(""),
            "graph": {"nodes": nodes, "links": [{"source": "a", "target": "c"}]},
        },
    }
    for kind, request in requests.items():
        request["request_id"] = f"{prefix}-{kind}"
    return requests


def _dead_letter_at(client: KafkaTestClient, entry: Sent) -> list[Any]:
    found = []
    for letter in client.dead_letters:
        headers = dict(letter.headers)
        if (
            headers.get("graphinfer-dlq-topic") == entry.topic.encode()
            and headers.get("graphinfer-dlq-partition") == str(entry.partition).encode()
            and headers.get("graphinfer-dlq-offset") == str(entry.offset).encode()
        ):
            found.append(letter)
    return found


async def test_bad_input_dead_lettered_by_class(
    input_kafka: KafkaTestClient, input_worker: WorkerProcess
) -> None:
    prefix = f"bad{uuid.uuid4().hex[:6]}"
    cases = bad_cases(prefix)
    ledger = Ledger()
    for case in cases:
        await ledger.publish(
            input_kafka,
            case.value,
            key=case.key,
            headers=case.headers,
            request_id=f"{prefix}-{case.kind}" if case.recoverable else None,
            expect_dead_letter=True,
            kind=case.kind,
        )
    outcomes = await wait_for_terminal(input_kafka, ledger, timeout_s=60)
    recoverable = [entry.request_id for entry in ledger.sent if entry.request_id is not None]
    await wait_for_replies(input_kafka, recoverable, timeout_s=30)

    for case, entry in zip(cases, ledger.sent, strict=True):
        rows = outcomes.dead_letters.get((entry.partition, entry.offset), [])
        assert [row["code"] for row in rows] == [case.code], case.kind
        letters = _dead_letter_at(input_kafka, entry)
        assert len(letters) == 1, case.kind
        assert letters[0].value == case.value, case.kind
        assert dict(letters[0].headers)["graphinfer-dlq-code"] == case.code.encode(), case.kind
        if case.recoverable:
            [reply] = input_kafka.replies[f"{prefix}-{case.kind}"]
            assert reply["status"] == "rejected", case.kind
            assert reply["error"]["code"] == case.code, case.kind
    # The tombstone arrived at the agent as a message without a value.
    tombstone = next(entry for entry in ledger.sent if entry.kind == "tombstone")
    assert _dead_letter_at(input_kafka, tombstone)[0].value is None

    report(
        "bad_input_classes",
        classes=len(cases),
        sent=len(ledger.sent),
        rejected_replies=sum(len(input_kafka.replies[request_id]) for request_id in recoverable),
        dead_letters=sum(
            len(outcomes.dead_letters.get((entry.partition, entry.offset), [])) for entry in ledger.sent
        ),
        lost=0,
    )
    assert input_worker.process.poll() is None


async def test_awkward_graphs_answered(input_kafka: KafkaTestClient) -> None:
    prefix = f"awk{uuid.uuid4().hex[:6]}"
    requests = awkward_requests(prefix)
    for request in requests.values():
        await input_kafka.publish(request, headers=[("traceparent", b"00-\x00garbage")])
    await wait_for_replies(
        input_kafka, [request["request_id"] for request in requests.values()], timeout_s=60
    )

    for kind, request in requests.items():
        [reply] = input_kafka.replies[request["request_id"]]
        assert reply["status"] == "ok", (kind, reply)
        by_model = {result["model"]: result for result in reply["results"]}
        assert set(by_model["structure"]["output"]["probabilities"]) == {"no", "yes"}, kind
        returned = [item["id"] for item in by_model["node-sgc"]["output"]["nodes"]]
        sent = [node["id"] for node in request["graph"]["nodes"]]
        assert returned == sent, kind
        assert [type(value) for value in returned] == [type(value) for value in sent], kind
    rows = await input_kafka.fetch(
        "SELECT request_id, traceparent FROM inference_requests WHERE request_id = ANY($1)",
        [request["request_id"] for request in requests.values()],
    )
    assert len(rows) == len(requests)
    assert all(row["traceparent"] is None for row in rows), "a malformed traceparent is not stored"
    report("awkward_graphs", sent=len(requests), replies_ok=len(requests), rejected=0)


# --- property-based: valid, random and mutated messages ----------------------------------

_NODE_ID = st.one_of(
    st.integers(min_value=-50, max_value=50),
    st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=6),
)
_FEATURE = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False)
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(alphabet=string.ascii_letters, max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
MUTATIONS = (
    "drop_id",
    "bad_id",
    "unknown_field",
    "edge_to_missing",
    "duplicate_node",
    "bool_id",
    "float_id",
    "nan_literal",
    "duplicate_key",
    "truncate",
    "graph_not_object",
    "unknown_model",
    "unknown_task",
    "schema_header",
    "key_mismatch",
    "targets_missing",
    "tombstone",
    "nul_metadata",
    "ragged_features",
    "too_many_nodes",
    "not_utf8",
)
# Mutations after which the request_id can no longer be read from the message.
_ID_LOST = {"drop_id", "bad_id", "nan_literal", "duplicate_key", "truncate", "tombstone", "not_utf8"}


@dataclass
class Generated:
    kind: str
    value: bytes | None
    key: str | None
    headers: list[tuple[str, bytes]]
    request_id: str | None
    valid: bool


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    node_ids = draw(st.lists(_NODE_ID, min_size=1, max_size=8, unique_by=str))
    pairs = draw(st.lists(st.tuples(st.sampled_from(node_ids), st.sampled_from(node_ids)), max_size=12))
    model = draw(st.sampled_from(MODELS))
    document: dict[str, Any] = {
        "request_id": "",
        "graph": {
            "directed": draw(st.booleans()),
            "multigraph": draw(st.booleans()),
            "nodes": [
                {
                    "id": node_id,
                    "label": draw(st.sampled_from("CNO")),
                    "features": [draw(_FEATURE), draw(_FEATURE)],
                }
                for node_id in node_ids
            ],
            "edges": [{"source": source, "target": target} for source, target in pairs],
        },
        "models": [model],
        "metadata": draw(st.dictionaries(_TEXT, _TEXT, max_size=2)),
    }
    if model == "node-sgc" and draw(st.booleans()):
        document["targets"] = {"nodes": draw(st.lists(st.sampled_from(node_ids), min_size=1, max_size=3))}
    return document


def _mutate(kind: str, document: dict[str, Any], request_id: str) -> Generated:
    document = json.loads(json.dumps(document))
    key: str | None = request_id
    headers: list[tuple[str, bytes]] = []
    graph = document["graph"]
    first = graph["nodes"][0]
    raw: bytes | None = None
    if kind == "drop_id":
        del document["request_id"]
    elif kind == "bad_id":
        document["request_id"] = "bad id " + request_id
    elif kind == "unknown_field":
        document["colour"] = "blue"
    elif kind == "edge_to_missing":
        graph["edges"].append({"source": first["id"], "target": "missing-node-id"})
    elif kind == "duplicate_node":
        graph["nodes"].append(dict(first))
    elif kind == "bool_id":
        graph["nodes"].append({**first, "id": True})
    elif kind == "float_id":
        graph["nodes"].append({**first, "id": 0.25})
    elif kind == "graph_not_object":
        document["graph"] = "a-b"
    elif kind == "unknown_model":
        document["models"] = ["missing-model"]
    elif kind == "unknown_task":
        document["task"] = "community"
    elif kind == "schema_header":
        headers = [("graphinfer-schema", b"7")]
    elif kind == "key_mismatch":
        key = "not-" + request_id
    elif kind == "targets_missing":
        document["targets"] = {"nodes": ["missing-node-id"]}
    elif kind == "nul_metadata":
        document["metadata"] = {"tenant": "a\u0000b"}
    elif kind == "ragged_features":
        graph["nodes"].append({"id": "ragged-node", "label": "C", "features": [1.0, 2.0, 3.0]})
    elif kind == "too_many_nodes":
        graph["nodes"] = [
            {"id": index, "label": "C", "features": [0.0, 0.0]} for index in range(MAX_NODES + 1)
        ]
        graph["edges"] = []
    encoded = json.dumps(document).encode()
    if kind == "nan_literal":
        raw = encoded.replace(b'"features": [', b'"features": [NaN, ', 1)
    elif kind == "duplicate_key":
        raw = b'{"graph": {"nodes": []}, ' + encoded[1:]
    elif kind == "truncate":
        raw = encoded[: len(encoded) // 2]
    elif kind == "not_utf8":
        raw = encoded[:-1] + b"\xff}"
    elif kind != "tombstone":
        raw = encoded
    return Generated(kind, raw, key, headers, None if kind in _ID_LOST else request_id, valid=False)


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, Any, Any]:
    choice = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "random_json", "random_bytes"]))
    if choice == "valid":
        return choice, draw(valid_documents()), None
    if choice == "mutated":
        return choice, draw(valid_documents()), draw(st.sampled_from(MUTATIONS))
    if choice == "random_json":
        return choice, draw(_JSON), None
    return choice, draw(st.binary(max_size=48)), None


def generate_messages(prefix: str, examples: int) -> list[Generated]:
    """Draw messages with hypothesis (derandomized), then give each a unique request_id."""
    drawn: list[tuple[str, Any, Any]] = []

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(messages(), min_size=1, max_size=4))
    def collect(batch: list[tuple[str, Any, Any]]) -> None:
        drawn.extend(batch)

    collect()
    generated: list[Generated] = []
    for position, (choice, payload, mutation) in enumerate(drawn):
        request_id = f"{prefix}-{position}"
        if choice == "valid":
            payload["request_id"] = request_id
            generated.append(
                Generated("valid", json.dumps(payload).encode(), request_id, [], request_id, True)
            )
        elif choice == "mutated":
            payload["request_id"] = request_id
            generated.append(_mutate(mutation, payload, request_id))
        elif choice == "random_json":
            generated.append(
                Generated("random_json", json.dumps(payload).encode(), request_id, [], None, False)
            )
        else:
            generated.append(Generated("random_bytes", payload, request_id, [], None, False))
    return generated


async def test_generated_messages_each_end_once(
    input_kafka: KafkaTestClient, input_worker: WorkerProcess
) -> None:
    prefix = f"gen{uuid.uuid4().hex[:6]}"
    generated = generate_messages(prefix, examples=60)
    ledger = Ledger()
    for item in generated:
        await ledger.publish(
            input_kafka,
            item.value,
            key=item.key,
            headers=item.headers,
            request_id=item.request_id,
            expect_reply=item.request_id is not None,
            expect_dead_letter=not item.valid,
            kind=item.kind,
        )
    outcomes = await wait_for_terminal(input_kafka, ledger, timeout_s=90)
    await wait_for_replies(input_kafka, ledger.request_ids, timeout_s=60)

    kinds = Counter(
        item.kind if item.kind in ("valid", "random_json", "random_bytes") else "mutated"
        for item in generated
    )
    for item, entry in zip(generated, ledger.sent, strict=True):
        assert outcomes.terminal(entry) == 1, (item.kind, entry)
        letters = outcomes.dead_letters.get((entry.partition, entry.offset), [])
        if item.valid:
            assert letters == [], (item.kind, letters)
            [reply] = input_kafka.replies[entry.request_id or ""]
            assert reply["status"] == "ok", reply
        else:
            assert len(letters) == 1, item.kind
            assert len(_dead_letter_at(input_kafka, entry)) == 1, item.kind
        if entry.request_id is not None:
            assert input_kafka.replies[entry.request_id], item.kind
    assert all(count == 1 for count in outcomes.predictions.values()), "duplicate result rows"

    # The worker still answers.
    after = f"{prefix}-after"
    await input_kafka.publish(valid_request(after))
    [reply] = (await input_kafka.wait_for_replies(after, timeout=30))[:1]
    assert reply["status"] == "ok"
    assert input_worker.process.poll() is None

    report(
        "generated_messages",
        sent=len(ledger.sent),
        valid=kinds["valid"],
        mutated=kinds["mutated"],
        random=kinds["random_json"] + kinds["random_bytes"],
        replies=sum(len(input_kafka.replies[request_id]) for request_id in ledger.request_ids),
        dead_letters=sum(
            len(outcomes.dead_letters.get((entry.partition, entry.offset), [])) for entry in ledger.sent
        ),
        rows=sum(outcomes.predictions.values()),
        duplicates=0,
        lost=0,
    )


async def test_dead_letter_counters_match_rows(
    input_kafka: KafkaTestClient, input_worker: WorkerProcess
) -> None:
    # Runs last in this module: stopping the worker writes its counters to the log.
    stop_worker(input_worker)
    [line] = log_lines(input_worker, r"worker stopped name=")
    counted = {
        code: int(value)
        for code, value in re.findall(r"graphinfer_worker_dead_letters_total\{code=(\w+)\}=(\d+)", line)
    }
    rows = await input_kafka.fetch(
        "SELECT code, count(*) AS n FROM dead_letters WHERE topic = $1 GROUP BY code",
        input_kafka.request_topic,
    )
    assert counted == {row["code"]: row["n"] for row in rows}
    assert input_worker.process.returncode == 0
