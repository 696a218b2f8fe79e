"""Recompute the demo models' held-out metrics from a model repository, through the serving engine.

Usage: ``python -m graphinfer.models.reproduce REPOSITORY``. Prints one JSON
object, ``{model: {metric: value}}``, for the demo models served from
REPOSITORY; compare it with the ``metrics`` of their manifests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from graphinfer.models.training import reproduce_metrics


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m graphinfer.models.reproduce REPOSITORY", file=sys.stderr)
        return 2
    print(json.dumps(reproduce_metrics(Path(argv[0])), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
