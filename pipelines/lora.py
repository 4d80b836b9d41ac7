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


def _state_dict(lora: LoraRequest) -> dict[str, Any]:
    """The file's tensors, keyed as diffusers' loader reads them: PEFT-style files that name the
    transformer's layers bare (``transformer_blocks.0.attn.to_q.lora_A.weight``) get the
    ``transformer.`` prefix the loader matches on."""
    from safetensors.torch import load_file

    try:
        state = load_file(lora.path)
    except Exception as exc:  # not a safetensors file, truncated...
        raise LoraError(f"could not read LoRA {lora.key[:200]!r}: {type(exc).__name__}: {exc}") from exc
    if state and all(key.startswith("transformer_blocks.") for key in state):
        state = {f"transformer.{key}": value for key, value in state.items()}
    return state


class LoraManager:
    def __init__(self, pipe: Any, max_loaded: int = 4) -> None:
        self.pipe = pipe
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> its key, least recent first
        self.pinned: dict[str, float] = {}  # adapter name -> scale, active in every job
        self.fused: list[str] = []  # LoRAs merged into the base weights

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
            self.pipe.load_lora_weights(_state_dict(lora), adapter_name=name)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise LoraError(f"could not load LoRA {lora.key[:200]!r}: {type(exc).__name__}: {exc}") from exc
        # diffusers only warns when no key of the file matches the transformer: then nothing was
        # loaded, and the job would run without it. Say so instead.
        if name not in self.pipe.get_list_adapters().get("transformer", []):
            raise LoraError(
                f"LoRA {lora.key[:200]!r} has no weights for this model's transformer "
                "(its keys name none of the transformer's layers)"
            )
        self.loaded[name] = lora.key
        log.info("lora loaded", adapter=name, lora=lora.key[:200])
        return name

    def pin(self, lora: LoraRequest, *, fuse: bool = False) -> None:
        """An adapter every job uses (e.g. the Lightning LoRA), at ``lora.scale``. ``fuse`` merges it
        into the base weights for good: no adapter path left to run each step."""
        name = self._ensure_loaded(lora, keep=set(self.pinned))
        if fuse and list(self.loaded) == [name]:
            self.pipe.fuse_lora(adapter_names=[name], lora_scale=lora.scale)
            self.pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
            del self.loaded[name]
            self.fused.append(lora.key)
            log.info("lora fused into the base weights", lora=lora.key[:200])
            return
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
