"""Short-lived signed PUT URLs for the ticket upload flow (the client PUTs without an API key)."""

from __future__ import annotations

import hashlib
import hmac
import time

from server.errors import Forbidden


class UploadSigner:
    def __init__(self, key: bytes, ttl_s: int) -> None:
        self._key = key
        self.ttl_s = ttl_s

    def _mac(self, upload_key: str, size: int, expires: int) -> str:
        msg = f"{upload_key}\n{size}\n{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def sign(self, upload_key: str, size: int) -> tuple[int, str]:
        expires = int(time.time()) + self.ttl_s
        return expires, self._mac(upload_key, size, expires)

    def verify(self, upload_key: str, size: int, expires: int, signature: str) -> None:
        # Bytes, not str: compare_digest raises TypeError on non-ASCII text (a 500 found by fuzzing).
        if not hmac.compare_digest(self._mac(upload_key, size, expires).encode(), signature.encode()):
            raise Forbidden("Invalid upload signature.")
        if expires < time.time():
            raise Forbidden("This upload URL has expired; ask for a new one.")
