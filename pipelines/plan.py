"""Memory plans: which memory mode (and weight quantization) a worker uses, and what each costs.

Estimates are computed from the real architecture, built on the meta device from the model's own
configs (pipelines/architecture.py), at the streaming granularity each mode really has in
``pipelines.memory.apply_plan``:

    full                   every component resident on the GPU
    text-encoder-offload   transformer + VAE resident; the text encoder streamed leaf by leaf
    model-offload          one whole component at a time (diffusers' enable_model_cpu_offload)
    group-block            transformer streamed block by block (one prefetched on a CUDA stream;
                           its embedders and norms resident meanwhile), text encoder leaf by leaf,
                           VAE resident
    group-leaf             every component streamed leaf by leaf

The peak adds an activation estimate (at ~1 MP with true CFG: latents, attention over ~9.6 k
tokens, the VAE at full resolution, the CUDA context) that the GPU truth table replaces with a
measurement. Host RAM counts the weights that live in host memory (pinned, once: group offloading
runs with ``low_cpu_mem_usage``) plus the process itself; components resident on the GPU are
loaded straight there, never staged in host RAM.

``auto`` takes the fastest mode whose peak fits 90 % of the GPU's free memory and whose host RAM
fits what the machine has, among the quantizations installed here (torchao) and computed by the GPU
(fp8: compute capability 8.9+).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.registry import Variant

MemoryMode = Literal["full", "text-encoder-offload", "model-offload", "group-block", "group-leaf"]
Quantize = Literal["none", "fp8", "int8"]
MODES: tuple[str, ...] = ("full", "text-encoder-offload", "model-offload", "group-block", "group-leaf")
QUANTIZE: tuple[str, ...] = ("none", "fp8", "int8")
GB = 1e9
ACTIVATIONS_GB = 4.0  # an estimate: see the module docstring
PROCESS_RAM_GB = 3.0  # the worker itself: torch, CUDA runtime, Python, the tokenizer
HEADROOM = 0.9

# The order auto tries them in: fastest first (resident beats streamed; 8-bit beats streaming
# bf16 over PCIe; fp8 has tensor cores where int8 weight-only does not).
CANDIDATES: tuple[tuple[str, str], ...] = (
    ("full", "none"),
    ("full", "fp8"),
    ("text-encoder-offload", "none"),
    ("text-encoder-offload", "fp8"),
    ("full", "int8"),
    ("text-encoder-offload", "int8"),
    ("model-offload", "none"),
    ("group-block", "fp8"),
    ("group-block", "int8"),
    ("group-block", "none"),
    ("group-leaf", "none"),
)


@dataclass(frozen=True)
class Sizes:
    """Bytes that matter to placement, in GB, at the weights' dtype (2 bytes a parameter)."""

    transformer: float
    transformer_block: float  # the largest of its repeated blocks
    transformer_block_linear: float  # that block's Linear weights
    transformer_rest: float  # what is not in a block: embedders, norms, the output layer
    transformer_linear: float  # the blocks' Linear weights: what 8-bit quantization halves
    transformer_leaf: float  # its largest leaf module
    text_encoder: float
    text_encoder_leaf: float  # its largest leaf module (the vocabulary embedding, or the LM head)
    vae: float
    vae_leaf: float


@dataclass(frozen=True)
class Estimate:
    mode: str
    quantize: str
    peak_gb: float  # device memory
    host_ram_gb: float
    note: str


@dataclass(frozen=True)
class MemoryPlan:
    mode: MemoryMode
    quantize: Quantize
    estimated_peak_gb: float | None  # None: nothing to estimate (the CPU, or a model too small to matter)
    reason: str
    host_ram_gb: float | None = None


def _bytes(module: Any) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / GB


def _largest_leaf(module: Any) -> float:
    leaves = [m for m in module.modules() if not list(m.children())]
    return max((_bytes(m) for m in leaves), default=0.0)


def sizes_of(transformer: Any, text_encoder: Any, vae: Any) -> Sizes:
    blocks = list(transformer.transformer_blocks)

    def linear(block: Any) -> float:
        return sum(_bytes(m) for m in block.modules() if m.__class__.__name__ == "Linear")

    largest = max(blocks, key=_bytes)
    return Sizes(
        transformer=_bytes(transformer),
        transformer_block=_bytes(largest),
        transformer_block_linear=linear(largest),
        transformer_rest=_bytes(transformer) - sum(_bytes(b) for b in blocks),
        transformer_linear=sum(linear(b) for b in blocks),
        transformer_leaf=_largest_leaf(transformer),
        text_encoder=_bytes(text_encoder),
        text_encoder_leaf=_largest_leaf(text_encoder),
        vae=_bytes(vae),
        vae_leaf=_largest_leaf(vae),
    )


@functools.lru_cache(maxsize=8)
def real_sizes(variant: Variant, folder: str | None = None) -> Sizes:
    """Sizes of ``variant`` from the real configs (or a model folder's own), built on the meta device."""
    import torch

    if folder is not None and (Path(folder) / "transformer" / "config.json").is_file():
        return _folder_sizes(Path(folder), variant)
    from pipelines.architecture import build_components

    parts = build_components(variant, "real", device="meta", dtype=torch.bfloat16)
    return sizes_of(parts.transformer, parts.text_encoder, parts.vae)


def _folder_sizes(folder: Path, variant: Variant) -> Sizes:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from pipelines.architecture import quiet_libraries

    with quiet_libraries(), init_empty_weights(include_buffers=False):
        transformer = QwenImageTransformer2DModel.from_config(
            QwenImageTransformer2DModel.load_config(folder / "transformer")
        )
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(folder / "vae"))
        text_encoder = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(folder / "text_encoder"))
        for module in (transformer, vae, text_encoder):
            module.to(torch.bfloat16)
    return sizes_of(transformer, text_encoder, vae)


def estimate(mode: str, quantize: str, s: Sizes, activations_gb: float = ACTIVATIONS_GB) -> Estimate:
    """Device peak and host RAM of ``mode`` with the transformer at ``quantize``."""
    if mode not in MODES:
        raise ValueError(f"unknown memory mode {mode!r}; known: {', '.join(MODES)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; known: {', '.join(QUANTIZE)}")
    eight_bit = quantize != "none"  # the blocks' Linear weights at 1 byte instead of 2
    transformer = s.transformer - (s.transformer_linear / 2 if eight_bit else 0.0)
    block = s.transformer_block - (s.transformer_block_linear / 2 if eight_bit else 0.0)
    te_stream = 2 * s.text_encoder_leaf  # the leaf in use and the next, prefetched
    if mode == "full":
        peak, host, note = transformer + s.text_encoder + s.vae, 0.0, "everything resident"
    elif mode == "text-encoder-offload":
        peak, host = transformer + s.vae + te_stream, s.text_encoder
        note = "text encoder streamed leaf by leaf"
    elif mode == "model-offload":
        peak, host = max(transformer, s.text_encoder, s.vae), transformer + s.text_encoder + s.vae
        note = "one component at a time"
    elif mode == "group-block":
        peak = s.transformer_rest + 2 * block + te_stream + s.vae
        host = transformer + s.text_encoder
        note = "transformer block by block, text encoder leaf by leaf"
    else:
        peak = 2 * max(s.transformer_leaf, s.text_encoder_leaf, s.vae_leaf)
        host = transformer + s.text_encoder + s.vae
        note = "every component leaf by leaf"
    return Estimate(mode, quantize, round(peak + activations_gb, 2), round(host + PROCESS_RAM_GB, 2), note)


@dataclass(frozen=True)
class Machine:
    """What the plan is made for: the GPU's free memory and compute capability, the host's RAM,
    and what is installed here."""

    gpu_free_gb: float | None  # None: no GPU
    compute_capability: tuple[int, int] | None = None
    host_ram_gb: float | None = None
    torchao: bool = False

    @classmethod
    def here(cls, device: str) -> Machine:
        import torch

        ram = available_host_ram_gb()
        torchao = importlib.util.find_spec("torchao") is not None
        if not device.startswith("cuda") or not torch.cuda.is_available():
            return cls(None, None, ram, torchao)
        index = torch.device(device).index or 0
        free, _total = torch.cuda.mem_get_info(index)
        return cls(free / GB, tuple(torch.cuda.get_device_capability(index)), ram, torchao)  # type: ignore[arg-type]

    def quantizations(self) -> list[str]:
        out = ["none"]
        if self.torchao and self.compute_capability is not None:
            if self.compute_capability >= (8, 9):
                out.append("fp8")
            out.append("int8")
        return out


def available_host_ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def choose(machine: Machine, s: Sizes) -> tuple[MemoryPlan, list[tuple[Estimate, str]]]:
    """Auto's choice on ``machine``, and every candidate with why it was or was not taken."""
    if machine.gpu_free_gb is None:
        return MemoryPlan("full", "none", None, "no GPU: everything on the CPU"), []
    budget = machine.gpu_free_gb * HEADROOM
    allowed = machine.quantizations()
    verdicts: list[tuple[Estimate, str]] = []
    chosen: MemoryPlan | None = None
    for mode, quant in CANDIDATES:
        est = estimate(mode, quant, s)
        if quant not in allowed:
            why = "torchao is not installed" if not machine.torchao else "fp8 needs compute capability 8.9+"
        elif est.peak_gb > budget:
            why = f"peak {est.peak_gb:.1f} GB > {budget:.1f} GB usable"
        elif machine.host_ram_gb is not None and est.host_ram_gb > machine.host_ram_gb:
            why = f"host RAM {est.host_ram_gb:.1f} GB > {machine.host_ram_gb:.1f} GB available"
        elif chosen is None:
            why = "chosen: the fastest that fits"
            chosen = MemoryPlan(
                mode,  # type: ignore[arg-type]
                quant,  # type: ignore[arg-type]
                est.peak_gb,
                f"estimated peak {est.peak_gb:.1f} GB fits {budget:.1f} GB usable",
                est.host_ram_gb,
            )
        else:
            why = "fits, but slower than the chosen one"
        verdicts.append((est, why))
    if chosen is None:
        chosen = _least_bad(machine, s, budget, allowed)
        verdicts = [
            (
                e,
                "chosen: nothing fits, the least bad"
                if (e.mode, e.quantize) == (chosen.mode, chosen.quantize) and e.quantize in allowed
                else why,
            )
            for e, why in verdicts
        ]
    return chosen, verdicts


def _least_bad(machine: Machine, s: Sizes, budget: float, allowed: list[str]) -> MemoryPlan:
    """Nothing fits: the mode that overshoots least (device peak over the usable GPU memory, host
    RAM over what is available, whichever is worse), with a reason that says what is short."""
    ram = machine.host_ram_gb

    def overshoot(e: Estimate) -> float:
        return max(e.peak_gb / budget, e.host_ram_gb / ram if ram else 0.0)

    best = min((estimate(m, q, s) for m, q in CANDIDATES if q in allowed), key=overshoot)
    short = []
    if best.peak_gb > budget:
        short.append(f"its peak {best.peak_gb:.1f} GB > {budget:.1f} GB usable on the GPU")
    if ram is not None and best.host_ram_gb > ram:
        short.append(f"its host RAM {best.host_ram_gb:.1f} GB > {ram:.1f} GB available")
    return MemoryPlan(
        best.mode,  # type: ignore[arg-type]
        best.quantize,  # type: ignore[arg-type]
        best.peak_gb,
        f"no mode fits: {best.mode} + {best.quantize} misses least ({'; '.join(short)}); it may not run",
        best.host_ram_gb,
    )


def resolve(mode: str, quantize: str, machine: Machine, sizes: Sizes | None) -> MemoryPlan:
    """Settings (``auto`` or names) to a plan on ``machine``; ``sizes`` None: a model too small to plan for."""
    if mode not in ("auto", *MODES):
        raise ValueError(f"unknown memory mode {mode!r}; known: auto, {', '.join(MODES)}")
    if quantize not in ("auto", *QUANTIZE):
        raise ValueError(f"unknown quantize {quantize!r}; known: auto, {', '.join(QUANTIZE)}")
    if quantize not in ("auto", "none") and quantize not in machine.quantizations() and machine.gpu_free_gb is not None:
        raise ValueError(
            f"quantize={quantize} cannot run here: "
            + (
                "install torchao (pip install 'qwen-edit-server[quant]')"
                if not machine.torchao
                else "it needs a newer GPU"
            )
        )
    if sizes is None or machine.gpu_free_gb is None:
        why = "no GPU" if machine.gpu_free_gb is None else "a small model"
        return MemoryPlan(
            "full" if mode == "auto" else mode,  # type: ignore[arg-type]
            "none" if quantize == "auto" else quantize,  # type: ignore[arg-type]
            None,
            f"nothing to plan: {why}",
        )
    auto, _ = choose(machine, sizes)
    if mode == "auto" and quantize == "auto":
        return auto
    chosen_mode = auto.mode if mode == "auto" else mode
    chosen_quant = "none" if quantize == "auto" else quantize
    est = estimate(chosen_mode, chosen_quant, sizes)
    return MemoryPlan(chosen_mode, chosen_quant, est.peak_gb, "set in Settings", est.host_ram_gb)  # type: ignore[arg-type]


def report(machine: Machine, s: Sizes) -> dict[str, Any]:
    """``qwen-edit plan``'s answer: the choice, and every mode with its estimates and verdict."""
    chosen, verdicts = choose(machine, s)
    return {
        "machine": {
            "gpu_free_gb": machine.gpu_free_gb,
            "compute_capability": ".".join(map(str, machine.compute_capability))
            if machine.compute_capability
            else None,
            "host_ram_gb": machine.host_ram_gb,
            "torchao": machine.torchao,
        },
        "sizes_gb": {k: round(v, 3) for k, v in asdict(s).items()},
        "chosen": asdict(chosen),
        "modes": [{**asdict(e), "verdict": why} for e, why in verdicts],
    }
