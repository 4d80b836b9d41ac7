"""Which parallel layouts (pipelines/layout.py) fit a set of GPUs, and what each costs per GPU.

Per-GPU memory is the memory planner's estimate (pipelines/plan.py) with the layout's effect on it:

- ``tp=k`` shards the transformer blocks' Linear weights k ways (diffusers' ``_tp_plan``); embedders,
  norms and the AdaLN modulation stay whole on every rank;
- ``ulysses`` / ``ring`` split each pass's sequence: the activations shrink, the weights do not;
- ``cfg=2`` runs one pass a step per rank: the weights are whole on both ranks.

Every rank runs the text encoder and the VAE itself (each rank encodes the same prompt and decodes the
same latents: no broadcast of encodings to wait on), so they count on every GPU, resident or streamed
per the memory mode.

The speed-up is an estimate to rank layouts by, not a measurement: the transformer is ~97 % of a
50-step edit; cfg=2 takes the two passes at once (no extra work), Ulysses and Ring pay all-to-alls /
ring exchanges, TP all-reduces twice per block (vLLM-Omni measured 1.6x on 2 H200s). ``benchmarks/parallel.py``
measures them on a multi-GPU machine.

``auto`` prefers one process per GPU where the model fits resident on one GPU (more requests at
once, no collectives); where it does not, the smallest group whose shards fit resident; only when no
layout fits resident does it fall back to offloading on one GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from pipelines.layout import Layout
from pipelines.plan import ACTIVATIONS_GB, HEADROOM, Sizes, estimate

# Fraction of the ideal k-fold speed-up each kind of split keeps (an estimate; see the module doc).
EFFICIENCY = {"cfg": 0.97, "ulysses": 0.9, "ring": 0.85, "tp": 0.8}
TRANSFORMER_SHARE = 0.97  # of a 50-step true-CFG edit's time; the text encoder and VAE run unsplit
RESIDENT_MODES = ("full", "text-encoder-offload")
LAYOUTS = (
    "none",
    "cfg=2",
    "ulysses=2",
    "ring=2",
    "tp=2",
    "cfg=2,ulysses=2",
    "cfg=2,ring=2",
    "cfg=2,tp=2",
    "ulysses=4",
    "ulysses=2,ring=2",
    "tp=4",
    "cfg=2,ulysses=4",
    "cfg=2,tp=4",
)


@dataclass(frozen=True)
class LayoutEstimate:
    layout: str
    gpus: int  # per group
    groups: int  # groups on the machine
    memory_mode: str  # the fastest memory mode whose per-GPU peak fits
    peak_gb: float  # per GPU, in that mode
    speedup: float  # estimated latency ratio against one GPU
    verdict: str


def sharded(sizes: Sizes, layout: Layout) -> Sizes:
    """The sizes one rank of ``layout`` holds."""
    if layout.tp == 1:
        return sizes
    cut = sizes.transformer_linear * (1 - 1 / layout.tp)
    block_cut = sizes.transformer_block_linear * (1 - 1 / layout.tp)
    return replace(
        sizes,
        transformer=sizes.transformer - cut,
        transformer_linear=sizes.transformer_linear / layout.tp,
        transformer_block=sizes.transformer_block - block_cut,
        transformer_block_linear=sizes.transformer_block_linear / layout.tp,
        transformer_leaf=sizes.transformer_leaf / layout.tp,
    )


def speedup(layout: Layout) -> float:
    """Estimated single-request latency ratio against one GPU (Amdahl over the transformer's share)."""
    split = 1.0
    for name in ("cfg", "ulysses", "ring", "tp"):
        degree = getattr(layout, name)
        if degree > 1:
            split *= 1 + (degree - 1) * EFFICIENCY[name]
    return round(1 / ((1 - TRANSFORMER_SHARE) + TRANSFORMER_SHARE / split), 2)


def per_gpu(layout: Layout, sizes: Sizes, mode: str, quantize: str = "none") -> float:
    """Per-GPU peak (GB) of ``layout`` in memory ``mode``."""
    activations = ACTIVATIONS_GB / layout.sequence
    return estimate(mode, quantize, sharded(sizes, layout), activations).peak_gb


def layouts_for(gpus: int, gpu_free_gb: float, sizes: Sizes) -> tuple[str, list[LayoutEstimate]]:
    """Every layout that divides ``gpus``, with its per-GPU cost; and auto's choice among them."""
    budget = gpu_free_gb * HEADROOM
    rows: list[LayoutEstimate] = []
    for text in LAYOUTS:
        layout = Layout.parse(text)
        if layout.world_size > gpus:
            continue
        for mode in (*RESIDENT_MODES, "group-block"):
            peak = per_gpu(layout, sizes, mode)
            if peak <= budget:
                break
        fits = peak <= budget
        verdict = "fits" if fits else f"peak {peak:.1f} GB > {budget:.1f} GB usable"
        if fits and mode not in RESIDENT_MODES:
            verdict = "fits only with the transformer streamed"
        rows.append(
            LayoutEstimate(
                str(layout), layout.world_size, gpus // layout.world_size, mode, peak, speedup(layout), verdict
            )
        )
    chosen = _auto(rows)
    rows = [replace(r, verdict=("chosen by auto: " + r.verdict) if r.layout == chosen else r.verdict) for r in rows]
    return chosen, rows


def _auto(rows: list[LayoutEstimate]) -> str:
    resident = [r for r in rows if r.verdict == "fits" and r.memory_mode in RESIDENT_MODES]
    if any(r.layout == "none" for r in resident):
        return "none"
    if resident:
        return min(resident, key=lambda r: (r.gpus, -r.speedup)).layout
    return "none"  # nothing fits resident: one GPU, with offloading (pipelines/plan.py chooses how)


def auto_layout(gpus_free_gb: list[float], sizes: Sizes) -> tuple[Layout, str]:
    """``QWEN_EDIT_PARALLEL=auto`` on these GPUs (free GB each): the layout, and why."""
    if len(gpus_free_gb) < 2:
        return Layout(), f"{len(gpus_free_gb)} GPU(s): one process per GPU"
    chosen, rows = layouts_for(len(gpus_free_gb), min(gpus_free_gb), sizes)
    row = next(r for r in rows if r.layout == chosen)
    return Layout.parse(chosen), (
        f"{len(gpus_free_gb)} GPUs of {min(gpus_free_gb):.0f} GB free: {chosen} "
        f"({row.memory_mode}, ~{row.peak_gb:.1f} GB a GPU, {row.verdict})"
    )


def report(gpus: int, gpu_free_gb: float, sizes: Sizes) -> dict[str, Any]:
    chosen, rows = layouts_for(gpus, gpu_free_gb, sizes)
    return {"gpus": gpus, "gpu_free_gb": gpu_free_gb, "chosen": chosen, "layouts": [asdict(r) for r in rows]}
