"""LoRA references: checked at submit (API side), turned into local files for the pipeline (worker
side). ``pipelines/`` only ever sees a file on this machine's disk.

A client names a LoRA in one of three ways:

    https://host/path/style.safetensors   downloaded through the SSRF guard, capped, into a bounded cache
    style.safetensors, sub/style.safetensors
                                          a file inside one of this server's LoRA folders (QWEN_EDIT_LORA_DIRS)
    owner/repo/path/style.safetensors     a Hugging Face Hub file, only where QWEN_EDIT_LORA_HUB allows it;
                                          fetched from the Hub endpoint through the same guard and cache

Anything else (an absolute path outside the folders, a path that climbs out of one, a file that is
not there) gets one and the same refusal, so the answer tells nothing about the machine's files.
The operator's own LoRA (QWEN_EDIT_LIGHTNING_LORA) is trusted: any path, and the Hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
from pathlib import Path, PurePosixPath

import structlog

from server.errors import BadRequest, InvalidInput
from server.jobs.contract import LoraRef
from server.media.fetch import copy_capped, guarded_get
from server.media.netguard import BlockedDestination, InvalidURL, NetGuard
from server.settings import Settings

log = structlog.get_logger(__name__)

SUFFIX = ".safetensors"
_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


def not_offered(path: str) -> str:
    return (
        f"LoRA {path[:200]!r} is not one this server offers: give an http(s) URL of a .safetensors file, "
        "the name of a file in its LoRA folders, or (where the server allows it) a Hub file "
        "owner/repo/file.safetensors"
    )


def is_url(path: str) -> bool:
    return path.lower().startswith(("http://", "https://"))


def hub_parts(path: str) -> tuple[str, str] | None:
    """(repo id, file path) when ``path`` reads as ``owner/repo/file.safetensors``."""
    parts = path.removeprefix("hf://").split("/")
    if len(parts) < 3 or not path.endswith(SUFFIX) or not all(_HUB_PART.match(p) for p in parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def in_folder(path: str, folders: list[Path]) -> Path | None:
    """The file ``path`` names inside one of ``folders`` (None: outside them all, or not there).
    Relative paths are taken from each folder; an absolute one must already lie inside one."""
    if not path.endswith(SUFFIX) or "\0" in path or len(path) > 1024:
        return None
    for folder in folders:
        root = folder.resolve()
        try:
            candidate = (root / path).resolve()
        except (OSError, RuntimeError):
            continue
        if candidate.is_relative_to(root) and candidate.is_file():
            return candidate
    return None


def _lexically_inside(path: str, folders: list[Path]) -> bool:
    if not path.endswith(SUFFIX) or "\0" in path or len(path) > 1024:
        return False
    rel = PurePosixPath(path)
    if rel.is_absolute():
        return any(rel.is_relative_to(folder.resolve()) for folder in folders) and ".." not in rel.parts
    return ".." not in rel.parts


def check_at_submit(loras: list[LoraRef], settings: Settings, guard: NetGuard) -> None:
    """Refuse, with a 400, a LoRA the worker would refuse: an outbound URL the guard forbids, a Hub
    file where the Hub is not allowed, a path outside the LoRA folders."""
    if not loras:
        return  # the folders are resolved on disk (a realpath each): not on every submit's path
    folders = settings.resolved_lora_dirs
    for i, lora in enumerate(loras):
        field = f"loras[{i}].path"
        if is_url(lora.path):
            try:
                guard.check_url(lora.path)
            except BlockedDestination as exc:
                raise BadRequest(f"{field}: {exc}") from exc
            except InvalidURL as exc:
                raise BadRequest(f"{field} is not a valid URL: {exc}") from exc
            continue
        if in_folder(lora.path, folders) is not None:
            continue
        if hub_parts(lora.path) is not None:
            if settings.lora_hub:
                continue
        elif not any(folder.is_dir() for folder in folders) and _lexically_inside(lora.path, folders):
            # The folders live on another machine (a worker's): what cannot be seen here, it decides.
            continue
        raise BadRequest(f"{field}: {not_offered(lora.path)}")


class LoraFiles:
    """Worker side: a LoRA reference to a local file; downloads land in a cache bounded in bytes."""

    def __init__(self, settings: Settings, guard: NetGuard) -> None:
        self.settings = settings
        self.guard = guard
        self.cache_dir = settings.data_dir / "lora-cache"
        self._lock = threading.Lock()

    def local_file(self, path: str, *, trusted: bool = False) -> Path:
        """The file to load for ``path``; ``trusted`` (the operator's own setting) allows any local
        path and the Hub. Raises InvalidInput (1401) or MediaError (1402)."""
        if is_url(path):
            return self._cached(path, path, headers=None)
        local = in_folder(path, self.settings.resolved_lora_dirs)
        if local is None and trusted and Path(path).is_file():
            local = Path(path)
        if local is not None:
            return local
        hub = hub_parts(path)
        if hub is not None and (trusted or self.settings.lora_hub):
            return self._cached(path, self._hub_url(*hub), headers=self._hub_headers())
        raise InvalidInput(not_offered(path))

    @staticmethod
    def _hub_url(repo: str, filename: str) -> str:
        from huggingface_hub import constants

        return f"{constants.ENDPOINT.rstrip('/')}/{repo}/resolve/main/{filename}"

    @staticmethod
    def _hub_headers() -> dict[str, str] | None:
        token = os.environ.get("HF_TOKEN")
        return {"authorization": f"Bearer {token}"} if token else None

    def _cached(self, ref: str, url: str, headers: dict[str, str] | None) -> Path:
        target = self.cache_dir / (hashlib.sha256(ref.encode()).hexdigest()[:32] + SUFFIX)
        if target.is_file():
            target.touch()  # recently used: the last to be evicted
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".part-")
        try:
            with (
                os.fdopen(fd, "wb") as fh,
                guarded_get(
                    url, what="LoRA", timeout_s=self.settings.lora_fetch_timeout_s, guard=self.guard, headers=headers
                ) as resp,
            ):
                copy_capped(resp, fh, what="LoRA", url=ref, max_bytes=self.settings.lora_max_bytes)
            check_safetensors(Path(tmp), ref)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        log.info("lora downloaded", ref=ref[:200], bytes=target.stat().st_size)
        self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        """Least recently used first, until the cache holds at most ``lora_cache_bytes``."""
        with self._lock:
            files = sorted((p for p in self.cache_dir.glob(f"*{SUFFIX}") if p != keep), key=lambda p: p.stat().st_mtime)
            total = keep.stat().st_size + sum(p.stat().st_size for p in files)
            for old in files:
                if total <= self.settings.lora_cache_bytes:
                    break
                total -= old.stat().st_size
                with contextlib.suppress(OSError):
                    old.unlink()
                log.info("lora evicted from the download cache", file=old.name)


def check_safetensors(path: Path, ref: str) -> None:
    """A safetensors file: an 8-byte header length, then that much JSON, then the tensors."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if not 2 <= length <= min(_MAX_HEADER, path.stat().st_size - 8):
                raise ValueError("bad header length")
            header = json.loads(fh.read(length))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
    except (OSError, ValueError, struct.error) as exc:
        raise InvalidInput(f"LoRA {ref[:200]!r} is not a safetensors file ({exc})") from None
