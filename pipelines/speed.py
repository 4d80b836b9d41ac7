"""Speed settings applied to a loaded Qwen-Image-Edit pipeline.

Each is independent and reported: what was applied, and what was skipped and why.

- batched CFG: the conditional and unconditional transformer passes of a true-CFG step run as one
  forward of batch 2 (a diffusers ``ModelHook`` on the transformer; prompt embeddings padded to one
  length where they differ, with a mask, except on attention backends that take no mask: there the
  passes of unequal length stay two). Off by default until a GPU measures it: with a mask, PyTorch's
  SDPA leaves its flash kernel;
- attention backend: diffusers' attention dispatcher (``transformer.set_attention_backend``);
- regional ``torch.compile`` of the repeated transformer blocks, shapes marked dynamic;
- fp8 dynamic-activation linear layers (torchao), on GPUs with fp8 tensor cores: applied by the
  loader while the transformer loads (``fp8_dynamic``), before any placement;
- step caching (cache-dit's DBCache), a quality/speed trade-off, off by default;
- the condition cache (pipelines/cache.py): encodings of repeated input images reused, exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import structlog

from pipelines.cache import ConditionCache
from pipelines.hooks import CFGPair

log = structlog.get_logger(__name__)

_GROUP_OFFLOADING = "group_offloading"  # diffusers.hooks.group_offloading's hook name
ATTENTION_BACKENDS = ("default", "native", "flash", "_flash_3", "sage", "_native_cudnn", "_native_flash", "xformers")


@dataclass(frozen=True)
class SpeedConfig:
    batched_cfg: bool = False
    attention_backend: str = "default"  # "default": leave diffusers' choice alone
    compile: bool = False
    fp8: bool = False
    step_cache: bool = False
    step_cache_warmup_steps: int = 8  # DBCache: full steps before caching starts
    step_cache_threshold: float = 0.12  # DBCache residual difference threshold
    condition_cache: int = 16  # entries of the condition cache; 0: off

    @classmethod
    def from_settings(cls, settings: Any) -> SpeedConfig:
        """From an object with ``speed_*`` attributes (the server's Settings)."""
        return cls(
            batched_cfg=settings.speed_batched_cfg,
            attention_backend=settings.speed_attention_backend,
            compile=settings.speed_compile,
            fp8=settings.speed_fp8,
            step_cache=settings.speed_step_cache,
            step_cache_warmup_steps=settings.speed_step_cache_warmup_steps,
            step_cache_threshold=settings.speed_step_cache_threshold,
            condition_cache=settings.speed_condition_cache,
        )


@dataclass
class SpeedReport:
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # setting -> why

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        log.warning("speed setting not applied", setting=name, reason=reason)


def apply_speed(pipe: Any, config: SpeedConfig, device: str) -> SpeedReport:
    """Apply ``config`` to ``pipe`` in place (call once, after loading and moving to ``device``)."""
    report = SpeedReport()
    if config.attention_backend != "default":
        set_attention_backend(pipe.transformer, config.attention_backend, report)
    if config.fp8:  # the loader quantized at load time (load_pipeline's fp8_dynamic)
        reason = fp8_unavailable_reason(device)
        if reason:
            report.skip("fp8", reason)
        else:
            report.applied.append("fp8")
    if config.step_cache:
        enable_step_cache(pipe, config, report)
    if config.condition_cache > 0:
        # Before batched CFG, which then records the (possibly cached) encodings it is handed.
        ConditionCache.install(pipe, config.condition_cache)
        report.applied.append(f"condition_cache={config.condition_cache}")
    if config.batched_cfg:
        if "step_cache=dbcache" in report.applied:
            report.skip("batched_cfg", "step caching keeps separate cond/uncond caches; passes stay unbatched")
        else:
            BatchedCFG.install(pipe)
            report.applied.append("batched_cfg")
    if config.compile:
        compile_blocks(pipe.transformer, report)
    log.info("speed settings", applied=report.applied, skipped=report.skipped)
    return report


# --- attention backend -------------------------------------------------------------------


def set_attention_backend(transformer: Any, backend: str, report: SpeedReport) -> None:
    try:
        transformer.set_attention_backend(backend)
    except Exception as exc:  # unknown name, kernel package missing, wrong GPU
        report.skip("attention_backend", f"{backend!r} unavailable ({type(exc).__name__}: {exc}); using native")
        with contextlib.suppress(Exception):
            transformer.set_attention_backend("native")
        return
    report.applied.append(f"attention_backend={backend}")


def reset_attention_backend(transformer: Any) -> None:
    """Back to diffusers' default attention. ``set_attention_backend`` also sets a process-wide
    active backend (diffusers 0.42's ``_AttentionBackendRegistry``) that every other model in the
    process then uses: resetting the model's processors alone would leave it behind."""
    from diffusers.models.attention_dispatch import DIFFUSERS_ATTN_BACKEND, _AttentionBackendRegistry

    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = None
    _AttentionBackendRegistry.set_active_backend(DIFFUSERS_ATTN_BACKEND)


# --- regional compile --------------------------------------------------------------------


def compile_blocks(transformer: Any, report: SpeedReport) -> None:
    """Compile the repeated transformer block once; every block reuses the compiled code."""
    import torch

    # Image and text lengths change with the size and prompt: compile with dynamic shapes from
    # the start, so the common sizes share one graph instead of recompiling at each new size.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Group offloading runs compiler-disabled hooks around each block: a full graph cannot trace
    # them (every job would fail), so offloaded blocks compile in pieces around the hooks.
    fullgraph = not offloaded(transformer)
    if hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(fullgraph=fullgraph, dynamic=True)
    else:  # pragma: no cover - older diffusers
        for block in transformer.transformer_blocks:
            block.compile(fullgraph=fullgraph, dynamic=True)
    report.applied.append("compile=repeated_blocks" + ("" if fullgraph else " (graph breaks at the offload hooks)"))


def offloaded(module: Any) -> bool:
    """Whether diffusers' group offloading hooks run inside ``module``."""
    return any(
        getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(_GROUP_OFFLOADING) is not None
        for m in module.modules()
    )


# --- fp8 ---------------------------------------------------------------------------------


def fp8_unavailable_reason(device: str) -> str | None:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "fp8 matmuls need a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return "fp8 tensor cores need compute capability 8.9+ (Ada, Hopper)"
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    return None


# --- step caching ------------------------------------------------------------------------


def enable_step_cache(pipe: Any, config: SpeedConfig, report: SpeedReport) -> None:
    try:
        import cache_dit
    except ImportError:
        report.skip("step_cache", "cache-dit is not installed (pip install cache-dit)")
        return
    blocks = len(pipe.transformer.transformer_blocks)
    try:
        cache_dit.enable_cache(
            pipe,
            cache_config=cache_dit.DBCacheConfig(
                # F8B0 on the 60-block model; small models keep at least one cached block.
                Fn_compute_blocks=min(8, max(1, blocks // 2)),
                Bn_compute_blocks=0,
                max_warmup_steps=config.step_cache_warmup_steps,
                residual_diff_threshold=config.step_cache_threshold,
            ),
        )
    except Exception as exc:
        report.skip("step_cache", f"cache-dit refused this pipeline ({type(exc).__name__}: {exc})")
        return
    report.applied.append("step_cache=dbcache")


# --- batched CFG -------------------------------------------------------------------------


def pad_text(embeds: Any, mask: Any | None, length: int) -> tuple[Any, Any]:
    """Right-pad (batch, seq, dim) embeddings to ``length``; the bool mask marks the real tokens."""
    import torch

    batch, seq = embeds.shape[:2]
    if mask is None:
        mask = torch.ones((batch, seq), dtype=torch.bool, device=embeds.device)
    mask = mask.to(torch.bool)
    if seq < length:
        embeds = torch.cat([embeds, embeds.new_zeros((batch, length - seq, embeds.shape[2]))], dim=1)
        mask = torch.cat([mask, mask.new_zeros((batch, length - seq))], dim=1)
    return embeds, mask


class BatchedCFG(CFGPair):
    """Runs the pipeline's cond and uncond transformer calls of a step as one batch-2 forward
    (the shared mechanics: ``pipelines.hooks.CFGPair``).

    Where the two prompts differ in length the batch needs a padding mask; an attention backend
    that refuses masks (flash, sage...) says so on the first try, and from then on such steps run
    as two passes.
    """

    NAME = "qwen_edit_batched_cfg"
    ATTR = "_batched_cfg"

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.batched_calls = 0
        self.masks_supported = True

    @classmethod
    def install(cls, pipe: Any) -> BatchedCFG:
        installed = cls.installed(pipe)
        if installed is not None:
            return installed  # type: ignore[no-any-return]
        batched = cls(pipe)
        batched._attach(pipe)
        return batched

    def _pair(self, forward: Any, hidden: Any, kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        (pos, pos_mask), (neg, neg_mask) = self._encoded
        if pos.shape[0] != hidden.shape[0] or neg.shape[0] != hidden.shape[0]:
            return None
        both = self._both(forward, hidden, pos, pos_mask, neg, neg_mask, kwargs)
        if both is not None:
            self.batched_calls += 1
        return both

    def _both(
        self, forward: Any, hidden: Any, pos: Any, pos_mask: Any, neg: Any, neg_mask: Any, kwargs: dict[str, Any]
    ) -> tuple[Any, Any] | None:
        import torch

        batch = hidden.shape[0]
        length = max(pos.shape[1], neg.shape[1])
        same = pos.shape[1] == neg.shape[1] and pos_mask is None and neg_mask is None
        if same:
            text, mask = torch.cat([pos, neg]), None  # no padding: keep the mask-free attention path
        elif not self.masks_supported:
            return None
        else:
            pos, pos_mask = pad_text(pos, pos_mask, length)
            neg, neg_mask = pad_text(neg, neg_mask, length)
            text, mask = torch.cat([pos, neg]), torch.cat([pos_mask, neg_mask])
        both = dict(kwargs)
        both.update(
            hidden_states=torch.cat([hidden, hidden]),
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            return_dict=False,
        )
        for name in ("timestep", "guidance"):
            if both.get(name) is not None:
                both[name] = torch.cat([both[name], both[name]])
        if both.get("img_shapes") is not None:
            both["img_shapes"] = list(both["img_shapes"]) * 2
        try:
            out = forward(**both)[0]
        except ValueError as exc:
            if mask is None or "attn_mask" not in str(exc):
                raise
            self.masks_supported = False  # this backend takes no mask: two passes from now on
            log.warning("attention backend refuses masks: prompts of unequal length run as two passes", error=str(exc))
            return None
        return out[:batch], out[batch:]
