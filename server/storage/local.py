"""Files in a folder on this machine: the embedded default."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from server.storage.base import StorageError, valid_key

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._prefix = os.path.join(str(self.root), "")  # "<root>/": what every file's path starts with

    def _file(self, key: str) -> str:
        # Keys come from URLs: never let one escape the root, nor reach the OS in a shape it refuses.
        # On strings, not Paths: a put's path is made twice a job (its input, its output).
        if not valid_key(key):
            raise KeyError(key)
        try:
            path = os.path.realpath(self._prefix + key)
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, say
            raise KeyError(key) from exc
        if not path.startswith(self._prefix):
            raise KeyError(key)
        return path

    def _path(self, key: str) -> Path:
        return Path(self._file(key))

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._file(key)
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
    def _temp_beside(path: str) -> tuple[int, str]:
        # Write then rename: a reader never sees half a file, a crash leaves no partial one. The
        # folder is made when the temp file finds none (most puts share one made before), and made
        # again if the retention sweep emptied and removed it (inputs/<2 hex>/) in between.
        folder = os.path.dirname(path)
        for attempt in range(3):
            tmp = f"{folder}/.tmp-{secrets.token_hex(8)}"
            try:
                return os.open(tmp, _NEW_FILE, 0o600), tmp  # as tempfile.mkstemp makes it
            except FileNotFoundError:
                if attempt == 2:
                    raise
                os.makedirs(folder, exist_ok=True)
        raise AssertionError("unreachable")

    def get(self, key: str) -> bytes:
        try:
            with open(self._file(key), "rb") as fh:
                return fh.read()
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
