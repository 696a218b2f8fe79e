"""W3C trace context: keep the caller's ``traceparent`` or start a new trace."""

from __future__ import annotations

import re
import secrets

# version-traceid-parentid-flags, lower-case hex; all-zero ids are invalid.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def trace_context(header: str | None) -> str:
    """Return the request's valid ``traceparent``, or a new one when it has none or a malformed one."""
    if header is not None:
        match = _TRACEPARENT.match(header.strip().lower())
        if match and match.group(1) != "ff" and set(match.group(2)) != {"0"} and set(match.group(3)) != {"0"}:
            return match.group(0)
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
