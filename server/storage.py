"""Where input and output files live, behind one small interface.

Keys are relative POSIX paths (``outputs/<job id>/<random>.png``, ``uploads/<random>/<name>``).
Their random parts make them unguessable, so files are served without an API key, as the hosted
API's CDN links are.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class StorageError(Exception):
    """The storage backend failed (disk full, bucket unreachable...)."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str | None = None) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """The file's path when it is on this machine's disk (served directly), else None."""


def safe_filename(name: str, default: str = "file") -> str:
    base = os.path.basename(name.replace("\\", "/")).strip()
    base = _SAFE_NAME.sub("_", base).strip("._")[:100]
    return base or default


def new_upload_key(filename: str) -> str:
    return f"uploads/{secrets.token_urlsafe(18)}/{safe_filename(filename, 'upload')}"


def new_output_key(job_id: str, index: int, ext: str) -> str:
    return f"outputs/{job_id}/{index}-{secrets.token_hex(6)}.{ext}"


def content_type_of(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # Keys come from URLs: never let one escape the root (nor crash on a NUL byte).
        if "\0" in key:
            raise KeyError(key)
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise KeyError(key)
        return path

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees half a file, a crash leaves no partial one.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
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

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (OSError, KeyError) as exc:
            raise FileNotFoundError(key) from exc

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except KeyError:
            return False

    def delete(self, key: str) -> None:
        with contextlib.suppress(OSError, KeyError):
            self._path(key).unlink()

    def local_path(self, key: str) -> Path | None:
        try:
            path = self._path(key)
        except KeyError:
            return None
        return path if path.is_file() else None

    def iter_older_than(self, prefix: str, age_s: float) -> Iterator[str]:
        cutoff = time.time() - age_s
        base = self.root / prefix
        if not base.exists():
            return
        for path in base.rglob("*"):
            if path.is_file() and path.stat().st_mtime < cutoff:
                yield path.relative_to(self.root).as_posix()
