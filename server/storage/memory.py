"""Files in memory: a real Storage for fast tests (nothing on disk, nothing to clean up)."""

from __future__ import annotations

import threading
from pathlib import Path


class MemoryStorage:
    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        with self._lock:
            self._files[key] = bytes(data)

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._files[key]
            except KeyError:
                raise FileNotFoundError(key) from None

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._files

    def delete(self, key: str) -> None:
        with self._lock:
            self._files.pop(key, None)

    def local_path(self, key: str) -> Path | None:
        return None

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._files)
