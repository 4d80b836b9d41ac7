"""LoRAs per job, on a base model that stays loaded.

A job's ``loras`` (up to 3) arrive here as local ``.safetensors`` files (the server layer fetched
them: this module does no network I/O), are loaded as named adapters with diffusers'
``load_lora_weights``, activated with ``set_adapters`` for the job, and disabled after it
(``disable_lora``: the base weights are never changed, so the base output comes back exactly). The
last few adapters stay loaded (LRU); older ones are deleted with ``delete_adapters``. Adapters that
are always on (the Lightning LoRA) are ``pinned``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from pipelines.errors import PipelineInputError

log = structlog.get_logger(__name__)


class LoraError(PipelineInputError):
    """A LoRA cannot be loaded (the job's input is at fault: a 1401 failure)."""


@dataclass(frozen=True)
class LoraRequest:
    path: str  # a local .safetensors file
    scale: float = 1.0
    name: str | None = None  # what the client called it (a URL, a Hub file): the adapter's identity

    @property
    def key(self) -> str:
        return self.name or self.path


def adapter_name(key: str) -> str:
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class LoraManager:
    def __init__(self, pipe: Any, max_loaded: int = 4) -> None:
        self.pipe = pipe
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> its key, least recent first
        self.pinned: dict[str, float] = {}  # adapter name -> scale, active in every job

    def _ensure_loaded(self, lora: LoraRequest, keep: set[str]) -> str:
        name = adapter_name(lora.key)
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return name
        while len(self.loaded) >= self.max_loaded:
            old = next((n for n in self.loaded if n not in keep), None)
            if old is None:
                break
            self.pipe.delete_adapters(old)
            del self.loaded[old]
            log.info("lora evicted", adapter=old)
        try:
            self.pipe.load_lora_weights(lora.path, adapter_name=name)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise LoraError(f"could not load LoRA {lora.key[:200]!r}: {type(exc).__name__}: {exc}") from exc
        self.loaded[name] = lora.key
        log.info("lora loaded", adapter=name, lora=lora.key[:200])
        return name

    def pin(self, lora: LoraRequest) -> None:
        """Load an adapter that every job uses (e.g. the Lightning LoRA), at ``lora.scale``."""
        name = self._ensure_loaded(lora, keep=set(self.pinned))
        self.pinned[name] = lora.scale
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
        keep = set(self.pinned) | {adapter_name(lr.key) for lr in loras}
        extra: dict[str, float] = {}
        for lr in loras:
            name = self._ensure_loaded(lr, keep)
            extra[name] = extra.get(name, 0.0) + lr.scale
        try:
            self._activate(extra)
            yield
        finally:
            self._activate({})
