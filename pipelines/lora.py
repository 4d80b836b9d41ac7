"""LoRAs per job, on a base model that stays loaded.

A job's ``loras`` (up to 3 ``{path, scale}``) are resolved to local files (a local path, an
http(s) URL downloaded once into the cache folder, or a Hub file ``owner/repo/file.safetensors``),
loaded as named adapters with diffusers' ``load_lora_weights``, activated with ``set_adapters``
for the job, and disabled after it (``disable_lora``: the base weights are never changed, so the
base output comes back exactly). The last few adapters stay loaded (LRU); older ones are deleted
with ``delete_adapters``. Adapters that are always on (the Lightning LoRA) are ``pinned``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from pipelines.errors import PipelineInputError

log = structlog.get_logger(__name__)


class LoraError(PipelineInputError):
    """A LoRA cannot be fetched or loaded (the job's input is at fault: a 1401 failure)."""


@dataclass(frozen=True)
class LoraRequest:
    path: str
    scale: float = 1.0


def adapter_name(path: str) -> str:
    return "lora_" + hashlib.sha256(path.encode()).hexdigest()[:16]


def _download_url(url: str, cache_dir: Path, timeout_s: float) -> Path:
    import httpx

    target = cache_dir / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".safetensors")
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as response:
            response.raise_for_status()
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".part-")
            with os.fdopen(fd, "wb") as fh:
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)
        os.replace(tmp, target)
    except httpx.HTTPError as exc:
        raise LoraError(f"could not download LoRA {url}: {exc}") from exc
    return target


def resolve_file(path: str, cache_dir: Path, timeout_s: float = 60.0) -> Path:
    """A LoRA reference to a local ``.safetensors`` file."""
    if path.startswith(("http://", "https://")):
        return _download_url(path, cache_dir, timeout_s)
    local = Path(path)
    if local.is_file():
        return local
    parts = path.split("/")
    if len(parts) >= 3 and not path.startswith(("/", ".")):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), cache_dir=cache_dir / "hub"))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise LoraError(f"could not fetch LoRA {path!r} from the Hugging Face Hub: {exc}") from exc
    raise LoraError(f"LoRA {path!r} is not a local file, an http(s) URL, or a Hub file 'owner/repo/file.safetensors'")


class LoraManager:
    def __init__(self, pipe: Any, cache_dir: Path, max_loaded: int = 4, timeout_s: float = 60.0) -> None:
        self.pipe = pipe
        self.cache_dir = cache_dir
        self.max_loaded = max_loaded
        self.timeout_s = timeout_s
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> path, least recent first
        self.pinned: dict[str, float] = {}  # adapter name -> scale, active in every job

    def _ensure_loaded(self, path: str, keep: set[str]) -> str:
        name = adapter_name(path)
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return name
        file = resolve_file(path, self.cache_dir, self.timeout_s)
        while len(self.loaded) >= self.max_loaded:
            old = next((n for n in self.loaded if n not in keep), None)
            if old is None:
                break
            self.pipe.delete_adapters(old)
            del self.loaded[old]
            log.info("lora evicted", adapter=old)
        try:
            self.pipe.load_lora_weights(str(file), adapter_name=name)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise LoraError(f"could not load LoRA {path!r}: {type(exc).__name__}: {exc}") from exc
        self.loaded[name] = path
        log.info("lora loaded", adapter=name, path=path)
        return name

    def pin(self, path: str, scale: float = 1.0) -> None:
        """Load an adapter that every job uses (e.g. the Lightning LoRA)."""
        name = self._ensure_loaded(path, keep=set(self.pinned))
        self.pinned[name] = scale
        self._activate({})

    def _activate(self, extra: dict[str, float]) -> None:
        active = {**self.pinned, **extra}
        if active:
            self.pipe.enable_lora()
            self.pipe.set_adapters(list(active), list(active.values()))
        elif self.loaded:
            self.pipe.disable_lora()

    @contextlib.contextmanager
    def applied(self, loras: list[LoraRequest]) -> Iterator[None]:
        """The job's LoRAs active inside the block; afterwards only the pinned ones."""
        if not loras:
            yield
            return
        keep = set(self.pinned) | {adapter_name(lr.path) for lr in loras}
        extra: dict[str, float] = {}
        for lr in loras:
            name = self._ensure_loaded(lr.path, keep)
            extra[name] = extra.get(name, 0.0) + lr.scale
        try:
            self._activate(extra)
            yield
        finally:
            self._activate({})
