"""Example replay data sets built from the vendored data.

``python -m graphinfer.replay.examples mutag.jsonl.gz`` writes MUTAG as
bare node-link graphs, one per line, each with its id and its class name as
``label``. The label stays in the data set, so a replay can print accuracy,
and never reaches the model.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

from graphinfer.models import datasets

MUTAG_SPLITS = ("all", "test")


def mutag_replay_records(split: str = "all") -> list[dict[str, Any]]:
    """Return MUTAG as bare-graph replay records: all 188 graphs, or the 38 held out from training."""
    if split not in MUTAG_SPLITS:
        raise ValueError(f"split {split!r} is not one of {MUTAG_SPLITS}")
    records = datasets.load_mutag()
    if split == "test":
        _, records = datasets.mutag_holdout_split(records, seed=0)
    lines = []
    for record in records:
        graph = datasets.mutag_request(record, "unused")["graph"]
        lines.append({"id": record["id"], "label": datasets.mutag_class_name(record), **graph})
    return lines


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write ``records`` as JSON Lines, gzip-compressed when ``path`` ends in ``.gz``."""
    text = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write MUTAG as a replay data set of labelled bare graphs.")
    parser.add_argument("path", type=Path, help="output file; .gz compresses it")
    parser.add_argument(
        "--split", choices=MUTAG_SPLITS, default="all", help="all 188 graphs or the 38 held out"
    )
    options = parser.parse_args(arguments)
    records = mutag_replay_records(options.split)
    write_jsonl(options.path, records)
    print(f"wrote {len(records)} MUTAG graphs to {options.path}")


if __name__ == "__main__":
    main()
