"""The storage interface, its error, and how keys are made.

Keys are relative POSIX paths (``outputs/<job id>/<index>-<random>.png``, ``uploads/<random>/<name>``,
``inputs/<job id>/<index>-<random>.png``). Their random parts make them unguessable, so files are
served without an API key, as the hosted API's CDN links are.
"""

from __future__ import annotations

import mimetypes
import os
import re
import secrets
from pathlib import Path
from typing import Protocol

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class StorageError(Exception):
    """The storage backend failed (disk full, bucket unreachable...)."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str | None = None) -> None: ...

    def get(self, key: str) -> bytes:
        """The file's bytes; FileNotFoundError when there is none."""

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


def new_input_key(job_id: str, index: int, ext: str) -> str:
    return f"inputs/{job_id}/{index}.{ext}"


def content_type_of(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"
