"""Memory modes: where the pipeline's weights live while it runs, chosen from the free GPU memory.

| mode                 | what stays on the GPU                                   |
|----------------------|---------------------------------------------------------|
| full                 | everything                                              |
| text-encoder-offload | transformer + VAE; the text encoder streams in per leaf |
| model-offload        | one whole component at a time (enable_model_cpu_offload)|
| group-block          | one transformer block at a time, prefetched on a stream |
| group-leaf           | one layer at a time, prefetched on a stream             |

``quantize`` (none, fp8, int8) turns the transformer into weight-only fp8 or int8 via torchao,
halving its 40.9 GB; it combines with any mode. The peak numbers below are estimates from the
parameter counts (MODEL.md), not measurements: see README "Memory modes".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import structlog

log = structlog.get_logger(__name__)

MemoryMode = Literal["full", "text-encoder-offload", "model-offload", "group-block", "group-leaf"]
Quantize = Literal["none", "fp8", "int8"]
MODES: tuple[str, ...] = ("full", "text-encoder-offload", "model-offload", "group-block", "group-leaf")
QUANTIZE: tuple[str, ...] = ("none", "fp8", "int8")

GB = 1e9
# bf16 sizes of the real components (MODEL.md) and a margin for activations at ~1 MP with CFG.
TRANSFORMER_GB = 40.9
TEXT_ENCODER_GB = 16.6
VAE_GB = 0.25
ACTIVATIONS_GB = 4.0  # estimate: latents, attention at ~9.6 k tokens, CUDA context


@dataclass(frozen=True)
class MemoryPlan:
    mode: MemoryMode
    quantize: Quantize
    estimated_peak_gb: float
    reason: str


def estimated_peak_gb(mode: str, quantize: str = "none") -> float:
    """Estimated peak GPU memory of a mode (parameter counts + an activation margin; unmeasured)."""
    transformer = TRANSFORMER_GB / 2 if quantize in ("fp8", "int8") else TRANSFORMER_GB
    block = transformer / 60  # one of 60 transformer blocks
    if mode == "full":
        return transformer + TEXT_ENCODER_GB + VAE_GB + ACTIVATIONS_GB
    if mode == "text-encoder-offload":
        return transformer + VAE_GB + ACTIVATIONS_GB + 1.0  # + the text encoder's largest streamed layer
    if mode == "model-offload":
        return max(transformer, TEXT_ENCODER_GB) + ACTIVATIONS_GB
    if mode == "group-block":
        return 2 * block + VAE_GB + ACTIVATIONS_GB + 1.0  # current + prefetched block
    if mode == "group-leaf":
        return VAE_GB + ACTIVATIONS_GB + 1.0
    raise ValueError(f"unknown memory mode {mode!r}; known: {', '.join(MODES)}")


def choose_plan(free_gb: float | None, *, fp8_supported: bool = False, headroom: float = 0.9) -> MemoryPlan:
    """The fastest mode whose estimated peak fits ``headroom * free_gb`` (None: no GPU)."""
    if free_gb is None:
        return MemoryPlan("full", "none", 0.0, "no GPU: everything on the CPU")
    budget = free_gb * headroom
    candidates: list[tuple[MemoryMode, Quantize]] = [("full", "none"), ("text-encoder-offload", "none")]
    if fp8_supported:  # fp8 halves the transformer with little quality loss, and keeps it resident
        candidates += [("full", "fp8"), ("text-encoder-offload", "fp8")]
    candidates += [("group-block", "none"), ("group-leaf", "none")]
    for mode, quant in candidates:
        peak = estimated_peak_gb(mode, quant)
        if peak <= budget:
            return MemoryPlan(mode, quant, peak, f"estimated peak {peak:.1f} GB fits {budget:.1f} GB usable")
    peak = estimated_peak_gb("group-leaf")
    return MemoryPlan("group-leaf", "none", peak, f"only {free_gb:.1f} GB free: the smallest mode, it may not fit")


def gpu_facts(device: str) -> tuple[float | None, bool]:
    """(free GB on ``device``, whether it computes fp8) — (None, False) off the GPU."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None, False
    index = torch.device(device).index or 0
    free, _total = torch.cuda.mem_get_info(index)
    return free / GB, torch.cuda.get_device_capability(index) >= (8, 9)


def resolve_plan(mode: str, quantize: str, device: str) -> MemoryPlan:
    """Settings (``auto`` or a name) to a plan for ``device``."""
    if mode not in ("auto", *MODES):
        raise ValueError(f"unknown memory mode {mode!r}; known: auto, {', '.join(MODES)}")
    if quantize not in ("auto", *QUANTIZE):
        raise ValueError(f"unknown quantize {quantize!r}; known: auto, {', '.join(QUANTIZE)}")
    free, fp8 = gpu_facts(device)
    auto = choose_plan(free, fp8_supported=fp8)
    chosen_mode = auto.mode if mode == "auto" else mode
    chosen_quant = (auto.quantize if mode == "auto" else "none") if quantize == "auto" else quantize
    reason = auto.reason if mode == "auto" and quantize == "auto" else "set in Settings"
    return MemoryPlan(chosen_mode, chosen_quant, estimated_peak_gb(chosen_mode, chosen_quant), reason)  # type: ignore[arg-type]


def quantize_transformer(pipe: Any, quantize: str) -> None:
    """Weight-only fp8 or int8 transformer through torchao's ``quantize_``."""
    if quantize == "none":
        return
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError("quantize needs torchao: pip install 'qwen-edit-server[quant]'") from exc
    config = Float8WeightOnlyConfig() if quantize == "fp8" else Int8WeightOnlyConfig()
    quantize_(pipe.transformer, config)


def apply_plan(pipe: Any, plan: MemoryPlan, device: str) -> None:
    """Place ``pipe`` per ``plan``. Group offloading uses CUDA streams when ``device`` is a GPU; with
    ``device="cpu"`` the same hooks run (onload to the CPU), which is how the tests exercise them."""
    import torch

    quantize_transformer(pipe, plan.quantize)
    on_gpu = device.startswith("cuda")
    onload = torch.device(device)
    if plan.mode == "full":
        pipe.to(device)
    elif plan.mode == "model-offload":
        if not on_gpu:
            raise RuntimeError("model-offload needs a GPU (diffusers' enable_model_cpu_offload refuses the CPU)")
        pipe.enable_model_cpu_offload(device=device)
    elif plan.mode == "text-encoder-offload":
        pipe.enable_group_offload(
            onload_device=onload,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=on_gpu,
            exclude_modules=["transformer", "vae"],  # these are moved to the GPU whole
        )
    else:
        pipe.enable_group_offload(
            onload_device=onload,
            offload_device=torch.device("cpu"),
            offload_type="block_level" if plan.mode == "group-block" else "leaf_level",
            num_blocks_per_group=1 if plan.mode == "group-block" else None,
            use_stream=on_gpu,
        )
    log.info("memory plan applied", mode=plan.mode, quantize=plan.quantize, estimated_peak_gb=plan.estimated_peak_gb)
