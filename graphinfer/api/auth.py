"""API keys: ``Authorization: Bearer KEY`` mapped to a tenant.

Keys come from ``GRAPHINFER_API_KEYS`` as ``tenant=key`` pairs. A presented
key is compared with every configured key in constant time (over sha256
digests, so the key lengths do not show either), and the scan never stops
early.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from pydantic import SecretStr

from graphinfer.errors import ErrorDetail, GraphinferError


class ApiKeys:
    """The configured keys; empty means the gateway runs open."""

    def __init__(self, keys: Mapping[str, SecretStr]) -> None:
        self._digests = [
            (tenant, hashlib.sha256(key.get_secret_value().encode("utf-8")).digest())
            for tenant, key in keys.items()
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def tenant_for(self, token: str) -> str | None:
        """Return the tenant whose key is ``token``, or None when no key matches."""
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        found: str | None = None
        for tenant, digest in self._digests:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found

    def authenticate(self, token: str | None) -> str | None:
        """Return the caller's tenant; None when the gateway runs open.

        Raises :class:`GraphinferError` ``unauthorized`` for a missing or unknown key.
        """
        if not self.enabled:
            return None
        if not token:
            raise GraphinferError(
                "the request has no API key; send the header 'Authorization: Bearer KEY' with a key "
                "from GRAPHINFER_API_KEYS",
                code="unauthorized",
                details=[ErrorDetail("Authorization", None, "Bearer KEY")],
            )
        tenant = self.tenant_for(token)
        if tenant is None:
            raise GraphinferError(
                "the API key is not valid; send a key from GRAPHINFER_API_KEYS as 'Authorization: Bearer KEY'",
                code="unauthorized",
                details=[ErrorDetail("Authorization", "Bearer ***", "a configured key")],
            )
        return tenant
