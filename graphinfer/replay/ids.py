"""Run ids and request ids of replayed records.

A run id names the tick and the data set's content hash, so firing the same
tick on the same data again finds the same run, and a data set that changed
becomes a new run. A record's request id is the run id plus a hash of the
record's own id (or its position), so a retried or resumed run sends each
record under the id it had before and the worker stores it once.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

_TRIGGER_PREFIXES = {"schedule": "sched", "manual": "manual"}
_HASH_CHARS = 16
_RECORD_HASH_CHARS = 20


def make_run_id(trigger: str, tick: datetime, content_hash: str) -> str:
    """Return ``sched-20260308T070000Z-<16 hex>`` (or ``manual-...``), 40 characters at most."""
    prefix = _TRIGGER_PREFIXES[trigger]
    return f"{prefix}-{tick.astimezone(UTC):%Y%m%dT%H%M%S}Z-{content_hash[:_HASH_CHARS]}"


def make_request_id(run_id: str, record_key: str) -> str:
    """Return ``<run id>:<20 hex>``, within the v1 id form ``[A-Za-z0-9._:-]{1,128}``."""
    digest = hashlib.sha256(record_key.encode("utf-8")).hexdigest()[:_RECORD_HASH_CHARS]
    return f"{run_id}:{digest}"
