"""Bearer API keys, compared in constant time; a caller is known by a short digest of its key."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from server.errors import Unauthorized
from server.settings import Settings


def key_id(key: str) -> str:
    """A short, non-reversible name for a key (for logs, limits and job rows)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, settings: Settings, keys: list[str]) -> None:
        self.disabled = settings.auth_disabled
        self._keys = [k.encode() for k in keys]

    def __call__(self, request: Request) -> str | None:
        """The caller's key id; raises Unauthorized. Used as a FastAPI dependency."""
        if self.disabled:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        presented = token.strip().encode()
        # Compare against every key, whatever matches, so timing reveals nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise Unauthorized("Invalid API key.")
        return key_id(token.strip())
