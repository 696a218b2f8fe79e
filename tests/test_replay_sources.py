"""Replay data sets: formats, unreadable records, ids and content hashes."""

from __future__ import annotations

import gzip
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from graphinfer.models.schema import REQUEST_ID_PATTERN
from graphinfer.replay.examples import mutag_replay_records, write_jsonl
from graphinfer.replay.ids import make_request_id, make_run_id
from graphinfer.replay.sources import (
    DatasetError,
    DatasetReader,
    DatasetSpec,
    Record,
    iter_directory,
    iter_jsonl,
    make_request,
    summarize_path,
)

BARE = {"id": "g1", "label": "mutagenic", "nodes": [{"id": 1, "label": "C"}], "edges": []}
REQUEST = {
    "request_id": "r-7",
    "graph": {"nodes": [{"id": "a"}, {"id": "b"}], "edges": [{"source": "a", "target": "b"}]},
    "task": "graph",
    "metadata": {"tenant": "t1"},
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


async def read_all(spec: DatasetSpec, database_url: str | None = None, size: int = 3) -> list[Record]:
    records: list[Record] = []
    async for batch in DatasetReader(spec, database_url).batches(size):
        records.extend(batch)
    return records


def test_bare_graph_becomes_request_without_label(tmp_path: Path) -> None:
    [record] = list(iter_jsonl(write_lines(tmp_path / "one.jsonl", [json.dumps(BARE)])))

    assert record.error is None
    assert record.label == "mutagenic"
    assert record.record_id == "g1"
    request_id, value = make_request(record, "manual-20260101T000000Z-0123456789abcdef")
    document = json.loads(value)
    assert document["request_id"] == request_id
    assert document["graph"] == {"nodes": [{"id": 1, "label": "C"}], "edges": []}
    assert "label" not in document, "the expected label never reaches the model"
    assert "task" not in document
    assert document["metadata"] == {"replay_record": "g1"}


def test_v1_request_keeps_fields_gets_new_id(tmp_path: Path) -> None:
    [record] = list(iter_jsonl(write_lines(tmp_path / "one.jsonl", [json.dumps(REQUEST)])))

    _, value = make_request(record, "sched-20260101T000000Z-0123456789abcdef")
    document = json.loads(value)
    assert document["request_id"] != "r-7"
    assert document["task"] == "graph"
    assert document["metadata"] == {"tenant": "t1", "replay_record": "r-7"}
    assert record.key == 'id:"r-7"'


def test_request_ids_fit_and_repeat() -> None:
    run_id = make_run_id("schedule", datetime(2026, 1, 1, tzinfo=UTC), "ab" * 32)
    first = make_request_id(run_id, 'id:"some record with spaces / and é"')
    again = make_request_id(run_id, 'id:"some record with spaces / and é"')
    other_run = make_request_id(
        make_run_id("schedule", datetime(2026, 1, 1, 1, tzinfo=UTC), "ab" * 32), 'id:"some record"'
    )

    assert re.fullmatch(REQUEST_ID_PATTERN, first)
    assert first == again
    assert first.startswith(run_id + ":")
    assert other_run != first
    assert run_id == "sched-20260101T000000Z-abababababababab"


def test_broken_lines_named_and_reading_goes_on(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "broken.jsonl",
        [
            json.dumps(BARE),
            '{"id": "g2", "nodes": [',
            "[1, 2, 3]",
            "",
            '{"id": "g3", "edges": []}',
            '{"id": true, "nodes": []}',
            '{"id": "g1", "nodes": [{"id": 9}]}',
            '{"id": "g4", "nodes": [], "nodes": []}',
            '{"id": "g5", "weight": NaN, "nodes": []}',
            json.dumps({**BARE, "id": "g6"}),
        ],
    )
    records = list(iter_jsonl(path))
    errors = {record.location: record.error for record in records if record.error}

    assert [record.record_id for record in records if record.error is None] == ["g1", "g6"]
    assert set(errors) == {f"broken.jsonl:{line}" for line in (2, 3, 5, 6, 7, 8, 9)}
    assert "not valid JSON" in errors["broken.jsonl:2"]
    assert "a JSON list, not an object" in errors["broken.jsonl:3"]
    assert "neither a v1 request" in errors["broken.jsonl:5"]
    assert "use a string or an integer" in errors["broken.jsonl:6"]
    assert "repeats the record at broken.jsonl:1" in errors["broken.jsonl:7"]
    assert "appears twice" in errors["broken.jsonl:8"]
    assert "NaN" in errors["broken.jsonl:9"]
    assert summarize_path(DatasetSpec.from_path(path)).total == 9, "blank lines are not records"


def test_records_without_id_named_by_line(tmp_path: Path) -> None:
    graph = {"nodes": [{"id": 1}], "edges": []}
    path = write_lines(tmp_path / "plain.jsonl", [json.dumps(graph), json.dumps(graph)])
    first, second = iter_jsonl(path)

    assert first.key != second.key, "equal graphs on two lines are two records"
    assert first.record_id == "plain.jsonl:1"


def test_gzip_file_read_and_truncation_reported(tmp_path: Path) -> None:
    lines = [json.dumps({**BARE, "id": f"g{index}"}) for index in range(200)]
    data = gzip.compress("".join(line + "\n" for line in lines).encode())
    whole = tmp_path / "graphs.jsonl.gz"
    whole.write_bytes(data)
    truncated = tmp_path / "cut.jsonl"  # compressed despite its name
    truncated.write_bytes(data[: len(data) // 2])

    assert [record.record_id for record in iter_jsonl(whole)] == [f"g{index}" for index in range(200)]
    records = list(iter_jsonl(truncated))
    assert records[-1].error is not None
    assert "truncated or corrupt" in records[-1].error
    assert all(record.error is None for record in records[:-1])
    assert summarize_path(DatasetSpec.from_path(truncated)).total == len(records)


def test_directory_of_json_files(tmp_path: Path) -> None:
    folder = tmp_path / "graphs"
    folder.mkdir()
    (folder / "b.json").write_text(json.dumps(REQUEST))
    (folder / "a.json").write_text(json.dumps(BARE))
    (folder / "c.json").write_text("{broken")
    (folder / "notes.txt").write_text("not a graph")
    records = list(iter_directory(folder))

    assert [record.location for record in records] == ["graphs/a.json", "graphs/b.json", "graphs/c.json"]
    assert [record.record_id for record in records[:2]] == ["a.json", "b.json"], "the file name is the id"
    assert records[2].error is not None
    assert summarize_path(DatasetSpec.from_path(folder)).total == 3


def test_content_hash_follows_bytes(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "graphs.jsonl", [json.dumps(BARE)])
    before = summarize_path(DatasetSpec.from_path(path)).content_hash
    write_lines(path, [json.dumps({**BARE, "label": "non_mutagenic"})])
    after = summarize_path(DatasetSpec.from_path(path)).content_hash

    assert before != after


def test_missing_file_is_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        summarize_path(DatasetSpec.from_path(tmp_path / "nowhere.jsonl"))
    assert "nowhere.jsonl does not exist" in str(caught.value)


def test_mutag_example_has_labels_outside_graph(tmp_path: Path) -> None:
    records = mutag_replay_records()
    path = write_jsonl(tmp_path / "mutag.jsonl.gz", records)
    read = list(iter_jsonl(path))

    assert len(read) == 188
    assert len(mutag_replay_records("test")) == 38
    assert {record.label for record in read} == {"mutagenic", "non_mutagenic"}
    assert all(record.body is not None and "label" not in record.body["graph"] for record in read)


async def test_file_reader_batches_in_order(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "graphs.jsonl", [json.dumps({**BARE, "id": f"g{i}"}) for i in range(7)])
    records = await read_all(DatasetSpec.from_path(path), size=3)

    assert [record.record_id for record in records] == [f"g{i}" for i in range(7)]


async def test_query_reads_rows_through_cursor(database_url: str) -> None:
    table = f"replay_source_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, graph jsonb, label text)")
        rows = [(index, json.dumps({"nodes": [{"id": index}]}), "x") for index in range(1, 8)]
        rows.append((8, None, None))
        rows.append((9, json.dumps([1, 2]), None))
        await connection.executemany(f"INSERT INTO {table} VALUES ($1, $2::jsonb, $3)", rows)
        spec = DatasetSpec.from_query(f"SELECT id, graph, label FROM {table} ORDER BY id;")
        summary = await DatasetReader(spec, database_url).summary()
        records = await read_all(spec, database_url, size=4)
    finally:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
        await connection.close()

    assert summary.total == 9
    assert [record.record_id for record in records if record.error is None] == [str(i) for i in range(1, 8)]
    assert records[0].label == "x"
    assert records[0].key == "id:1"
    errors = {record.location: record.error for record in records if record.error}
    assert errors == {"id 8": "its graph is NULL", "id 9": "a JSON list, not an object"}


async def test_failing_query_is_dataset_error(database_url: str) -> None:
    spec = DatasetSpec.from_query("SELECT id, graph FROM no_such_table ORDER BY id")
    with pytest.raises(DatasetError) as caught:
        await DatasetReader(spec, database_url).summary()
    assert "no_such_table" in str(caught.value)
    assert "GRAPHINFER_REPLAY_DATASET_QUERY" in str(caught.value)
