"""Files in a folder on this machine: the embedded default."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from server.storage.base import StorageError, valid_key


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # Keys come from URLs: never let one escape the root, nor reach the OS in a shape it refuses.
        if not valid_key(key):
            raise KeyError(key)
        try:
            path = (self.root / key).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop, say
            raise KeyError(key) from exc
        if not path.is_relative_to(self.root) or path == self.root:
            raise KeyError(key)
        return path

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        try:
            fd, tmp = self._temp_beside(path)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StorageError(f"could not write {key}: {exc.strerror or exc}") from exc

    @staticmethod
    def _temp_beside(path: Path) -> tuple[int, str]:
        # Write then rename: a reader never sees half a file, a crash leaves no partial one. A
        # shared folder (inputs/<2 hex>/) emptied and removed by the retention sweep between our
        # mkdir and the temp file is made again.
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (OSError, KeyError) as exc:
            raise FileNotFoundError(key) from exc

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except (KeyError, OSError):
            return False

    def delete(self, key: str) -> None:
        with contextlib.suppress(OSError, KeyError):
            self._path(key).unlink()

    def local_path(self, key: str) -> Path | None:
        try:
            path = self._path(key)
            return path if path.is_file() else None
        except (KeyError, OSError):
            return None
