"""The storage interface, its error, and how keys are made.

Keys are relative POSIX paths (``outputs/<job id>/<index>-<random>.png``, ``uploads/<random>/<name>``,
``inputs/<2 hex>/<job id>-<index>-<random>.png``). Their random parts make them unguessable (one file's
link never leads to another's), so files are served without an API key, as the hosted API's CDN
links are.
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


MAX_KEY_BYTES = 1024  # S3's own limit; far under PATH_MAX
MAX_SEGMENT_BYTES = 255  # NAME_MAX of every common file system
MAX_SEGMENTS = 16


def valid_key(key: str) -> bool:
    """Whether ``key`` is one this server could have made: relative, short, no dot segments, no NUL.
    Keys arrive in URLs; refusing the rest up front means no backend ever sees (or errors on) them."""
    if not key or "\0" in key or "\\" in key or key.startswith("/"):
        return False
    try:
        if len(key.encode()) > MAX_KEY_BYTES:
            return False
    except UnicodeEncodeError:  # a lone surrogate
        return False
    parts = key.split("/")
    return len(parts) <= MAX_SEGMENTS and all(
        part not in ("", ".", "..") and len(part.encode()) <= MAX_SEGMENT_BYTES for part in parts
    )


def safe_filename(name: str, default: str = "file") -> str:
    base = os.path.basename(name.replace("\\", "/")).strip()
    base = _SAFE_NAME.sub("_", base).strip("._")[:100]
    return base or default


def new_upload_key(filename: str) -> str:
    return f"uploads/{secrets.token_urlsafe(18)}/{safe_filename(filename, 'upload')}"


def new_output_key(job_id: str, index: int, ext: str) -> str:
    return f"outputs/{job_id}/{index}-{secrets.token_hex(6)}.{ext}"


def new_input_key(job_id: str, index: int, ext: str) -> str:
    # Random like an output's: the job id is in every output link, an input must not follow from it.
    # In one of 256 shared folders (the id's first two hex digits), not a folder per job: a submit
    # makes no directory (on a local disk, an inode and an entry in a big parent each time).
    return f"inputs/{job_id[:2]}/{job_id}-{index}-{secrets.token_urlsafe(12)}.{ext}"


def content_type_of(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"
