"""Bearer API keys, compared in constant time; a caller is known by a short digest of its key.

A prediction belongs to the key that created it: another key sees a 404, as for an id that does not
exist. Admin keys (``QWEN_EDIT_ADMIN_KEYS``) see every prediction. With auth disabled there are no
owners, and everyone sees everything.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from server.errors import Unauthorized
from server.jobs.contract import Job
from server.settings import Settings


def key_id(key: str) -> str:
    """A short, non-reversible name for a key (for logs, limits and job rows)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Caller:
    key_id: str | None  # None: auth is disabled
    admin: bool = False

    def owns(self, job: Job) -> bool:
        """Whether this caller may read, cancel or delete ``job``."""
        return self.admin or self.key_id is None or job.api_key_id == self.key_id


class Authenticator:
    def __init__(self, settings: Settings, keys: list[str]) -> None:
        self.disabled = settings.auth_disabled
        self._keys = [k.encode() for k in keys]
        self._admin = [k.encode() for k in settings.admin_keys]

    def __call__(self, request: Request) -> Caller:
        """The caller; raises Unauthorized. Used as a FastAPI dependency."""
        if self.disabled:
            return Caller(key_id=None)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        presented = token.strip().encode()
        # Compare against every key, whatever matches, so timing reveals nothing.
        matched = admin = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        for key in self._admin:
            admin |= hmac.compare_digest(presented, key)
        if not (matched or admin):
            raise Unauthorized("Invalid API key.")
        return Caller(key_id=key_id(token.strip()), admin=admin)
