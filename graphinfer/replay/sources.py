"""Replay data sets: JSON Lines files, directories of JSON files and PostgreSQL queries.

A record is a v1 request (an object whose ``graph`` has ``nodes``) or a bare
node-link graph (an object with ``nodes``). Two keys belong to the data set
and never reach the model: ``label``, the expected output (a graph label, or
an object of node id to node label), and the record's own id (``request_id``
of a request, ``id`` of a bare graph). A bare graph is sent without a task,
so the worker's usual model selection applies.

A record that cannot be read is yielded with its location and the reason,
and reading goes on with the next one.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import zlib
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg

from graphinfer.errors import RequestRejected
from graphinfer.models.decode import parse_json
from graphinfer.replay.ids import make_request_id

QUERY_PREFIX = "sql:"
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_BYTES = 1 << 20
_TRUNCATED_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


class DatasetError(Exception):
    """The data set as a whole cannot be read: a missing file, a failing query."""


@dataclass(frozen=True)
class DatasetSpec:
    """The location of a data set: a file or directory path, or a SQL query."""

    kind: str
    location: str

    @classmethod
    def from_path(cls, path: Path) -> DatasetSpec:
        path = path.expanduser().absolute()
        return cls("directory" if path.is_dir() else "file", str(path))

    @classmethod
    def from_query(cls, query: str) -> DatasetSpec:
        query = query.strip().rstrip(";").strip()
        if not query:
            raise DatasetError("the replay query is empty; set GRAPHINFER_REPLAY_DATASET_QUERY to a SELECT")
        return cls("query", query)

    @classmethod
    def parse(cls, stored: str) -> DatasetSpec:
        """Read back the form :meth:`stored_form` wrote to ``replay_runs.dataset``."""
        if stored.startswith(QUERY_PREFIX):
            return cls.from_query(stored.removeprefix(QUERY_PREFIX))
        return cls.from_path(Path(stored))

    def stored_form(self) -> str:
        return QUERY_PREFIX + self.location if self.kind == "query" else self.location

    def __str__(self) -> str:
        return f"query {self.location!r}" if self.kind == "query" else self.location


@dataclass(frozen=True)
class Record:
    """One data set record, readable (``body`` set) or not (``error`` set)."""

    position: int
    location: str
    key: str = ""
    record_id: str = ""
    body: dict[str, Any] | None = None
    label: Any = None
    error: str | None = None


@dataclass(frozen=True)
class DatasetSummary:
    """The content hash that names a run, and the number of records for progress."""

    content_hash: str
    total: int


# --- one document to one record -------------------------------------------------


def record_from_document(
    document: Any, position: int, location: str, *, assigned_id: str | int | None = None
) -> Record:
    """Split a parsed record into the request body, its id and its label.

    ``assigned_id`` is the id the container gives the record (a file name, a
    query's id column) and overrides an id inside the document. Without
    either, the record is named by its position.
    """
    if not isinstance(document, dict):
        return _unreadable(position, location, f"a JSON {type(document).__name__}, not an object")
    fields = dict(document)
    label = fields.pop("label", None)
    graph = fields.get("graph")
    if isinstance(graph, dict) and "nodes" in graph:
        own_id = fields.pop("request_id", None)
        body = fields
    elif "nodes" in fields:
        own_id = fields.pop("id", None)
        body = {"graph": fields}
    else:
        return _unreadable(
            position,
            location,
            "neither a v1 request (an object whose graph has nodes) "
            "nor a node-link graph (an object with nodes)",
        )
    if assigned_id is not None:
        own_id = assigned_id
    if own_id is None:
        key, record_id = f"position:{position}", location
    elif isinstance(own_id, bool) or not isinstance(own_id, str | int):
        return _unreadable(
            position, location, f"its id {own_id!r} is a {type(own_id).__name__}; use a string or an integer"
        )
    else:
        key, record_id = "id:" + json.dumps(own_id), str(own_id)
    metadata = body.get("metadata")
    if metadata is None or isinstance(metadata, dict):
        # Downstream consumers of predictions find the record by this key.
        body["metadata"] = {**(metadata or {}), "replay_record": record_id}
    return Record(position, location, key, record_id, body, label)


def make_request(record: Record, run_id: str) -> tuple[str, bytes]:
    """Return the request id and the v1 request bytes that replay ``record`` in run ``run_id``."""
    assert record.body is not None, "only readable records become requests"
    request_id = make_request_id(run_id, record.key)
    document = {"request_id": request_id, **record.body}
    return request_id, json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _unreadable(position: int, location: str, reason: str) -> Record:
    return Record(position, location, error=reason)


def _parse(raw: bytes) -> Any:
    try:
        return parse_json(raw)
    except RequestRejected as exc:
        raise ValueError(exc.message) from None


class _DuplicateFilter:
    """A check that turns a second record with an id already seen into an unreadable one."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def check(self, record: Record) -> Record:
        if record.error is not None:
            return record
        first = self.seen.setdefault(record.key, record.location)
        if first == record.location:
            return record
        return _unreadable(
            record.position,
            record.location,
            f"its id {record.record_id!r} repeats the record at {first}; give each record its own id",
        )


# --- files and directories ---------------------------------------------------------


def _open_lines(path: Path) -> BinaryIO:
    try:
        with open(path, "rb") as handle:
            compressed = handle.read(2) == _GZIP_MAGIC
        return gzip.open(path, "rb") if compressed else open(path, "rb")  # type: ignore[return-value]
    except OSError as exc:
        raise DatasetError(
            f"cannot open the replay data set {path}: {exc.strerror or exc}; "
            "check GRAPHINFER_REPLAY_DATASET or --dataset"
        ) from None


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise DatasetError(
            f"cannot read the replay data set {path}: {exc.strerror or exc}; "
            "check GRAPHINFER_REPLAY_DATASET or --dataset"
        ) from None
    return digest.hexdigest()


def iter_jsonl(path: Path) -> Generator[Record, None, None]:
    """Yield the records of a JSON Lines file, gzip-compressed or not; blank lines are skipped."""
    duplicates = _DuplicateFilter()
    line_number = 0
    with _open_lines(path) as lines:
        try:
            for raw in lines:
                line_number += 1
                if not raw.strip():
                    continue
                location = f"{path.name}:{line_number}"
                try:
                    document = _parse(raw)
                except ValueError as exc:
                    yield _unreadable(line_number, location, str(exc))
                    continue
                yield duplicates.check(record_from_document(document, line_number, location))
        except _TRUNCATED_GZIP_ERRORS as exc:
            yield _unreadable(
                line_number + 1,
                f"{path.name}:{line_number + 1}",
                f"the gzip stream is truncated or corrupt after line {line_number} ({exc}); "
                "the rest of the file is not read",
            )


def _directory_files(path: Path) -> list[Path]:
    try:
        return sorted(child for child in path.iterdir() if child.suffix == ".json" and child.is_file())
    except OSError as exc:
        raise DatasetError(
            f"cannot list the replay data set directory {path}: {exc.strerror or exc}; "
            "check GRAPHINFER_REPLAY_DATASET or --dataset"
        ) from None


def iter_directory(path: Path) -> Generator[Record, None, None]:
    """Yield one record per ``*.json`` file of a directory, in file-name order."""
    for position, file in enumerate(_directory_files(path), start=1):
        location = f"{path.name}/{file.name}"
        try:
            document = _parse(file.read_bytes())
        except OSError as exc:
            yield _unreadable(position, location, f"cannot read it: {exc.strerror or exc}")
            continue
        except ValueError as exc:
            yield _unreadable(position, location, str(exc))
            continue
        # The file name is the record's id; an id inside the file does not override it.
        yield record_from_document(document, position, location, assigned_id=file.name)


def summarize_path(spec: DatasetSpec) -> DatasetSummary:
    """Hash a file's bytes or a directory's names and bytes, and count the records."""
    path = Path(spec.location)
    if spec.kind == "directory":
        digest = hashlib.sha256()
        files = _directory_files(path)
        for file in files:
            digest.update(file.name.encode() + b"\0" + _file_hash(file).encode() + b"\n")
        return DatasetSummary(digest.hexdigest(), len(files))
    if not path.is_file():
        raise DatasetError(
            f"the replay data set {path} does not exist or is not a file; "
            "check GRAPHINFER_REPLAY_DATASET or --dataset"
        )
    content_hash = _file_hash(path)
    total = 0
    with _open_lines(path) as lines:
        try:
            for raw in lines:
                total += bool(raw.strip())
        except _TRUNCATED_GZIP_ERRORS:
            total += 1  # iter_jsonl reports the corrupt tail as one unreadable record
    return DatasetSummary(content_hash, total)


# --- readers -------------------------------------------------------------------------


class DatasetReader:
    """A reader of one data set, in batches, with file work kept off the event loop."""

    def __init__(self, spec: DatasetSpec, database_url: str | None = None) -> None:
        self.spec = spec
        self.database_url = database_url

    async def summary(self) -> DatasetSummary:
        if self.spec.kind != "query":
            return await asyncio.to_thread(summarize_path, self.spec)
        content_hash = hashlib.sha256(self.spec.location.encode("utf-8")).hexdigest()
        connection = await self._connect()
        try:
            total = await connection.fetchval(f"SELECT count(*) FROM ({self.spec.location}) AS replay_rows")
        except asyncpg.PostgresError as exc:
            raise DatasetError(
                f"the replay query failed: {exc}; check GRAPHINFER_REPLAY_DATASET_QUERY"
            ) from None
        finally:
            await connection.close()
        return DatasetSummary(content_hash, int(total))

    async def batches(self, size: int) -> AsyncIterator[list[Record]]:
        """Yield the records in order, ``size`` at a time."""
        if self.spec.kind == "query":
            async for batch in self._query_batches(size):
                yield batch
            return
        path = Path(self.spec.location)
        records = iter_directory(path) if self.spec.kind == "directory" else iter_jsonl(path)
        try:
            while batch := await asyncio.to_thread(lambda: list(islice(records, size))):
                yield batch
        finally:
            records.close()

    async def _query_batches(self, size: int) -> AsyncIterator[list[Record]]:
        connection = await self._connect()
        duplicates = _DuplicateFilter()
        try:
            # A server-side cursor streams the rows; it needs a transaction.
            async with connection.transaction(readonly=True, isolation="repeatable_read"):
                batch: list[Record] = []
                position = 0
                async for row in connection.cursor(self.spec.location, prefetch=size):
                    position += 1
                    batch.append(duplicates.check(_record_from_row(row, position)))
                    if len(batch) >= size:
                        yield batch
                        batch = []
                if batch:
                    yield batch
        except asyncpg.PostgresError as exc:
            raise DatasetError(
                f"the replay query failed: {exc}; check GRAPHINFER_REPLAY_DATASET_QUERY"
            ) from None
        finally:
            await connection.close()

    async def _connect(self) -> asyncpg.Connection:
        if self.database_url is None:
            raise DatasetError("GRAPHINFER_DATABASE_URL is not set; a replay query runs in that database")
        try:
            return await asyncpg.connect(self.database_url, timeout=10)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise DatasetError(
                f"cannot connect to PostgreSQL for the replay query: {exc}; check GRAPHINFER_DATABASE_URL"
            ) from None


def _record_from_row(row: asyncpg.Record, position: int) -> Record:
    if len(row) < 2:
        return _unreadable(
            position, f"row {position}", "the query returned fewer than two columns (id, graph)"
        )
    own_id, graph = row[0], row[1]
    if own_id is None:
        return _unreadable(position, f"row {position}", "its id is NULL")
    location = f"id {own_id}"
    if graph is None:
        return _unreadable(position, location, "its graph is NULL")
    try:
        document = _parse(graph.encode("utf-8") if isinstance(graph, str) else bytes(graph))
    except (ValueError, TypeError) as exc:
        return _unreadable(position, location, str(exc))
    if isinstance(document, dict) and len(row) > 2 and row[2] is not None:
        document["label"] = row[2]
    if isinstance(own_id, bool) or not isinstance(own_id, int | str):
        own_id = str(own_id)
    return record_from_document(document, position, location, assigned_id=own_id)
