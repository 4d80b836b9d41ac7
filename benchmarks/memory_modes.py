"""Peak GPU memory and seconds per step of every memory mode, on the real-size architecture.

The weights' values do not change time or memory, so the real components are built from the real
configs with random bf16 weights (on the meta device, then materialised) and run through the same
loader placement (pipelines.memory.apply_plan) and runner as the server. ``--tiny`` runs the same
code on the tiny model on the CPU (CI runs it, so the script cannot rot).

    python -m benchmarks.memory_modes --tiny                         # CPU, seconds
    python -m benchmarks.memory_modes --modes full,group-block --steps 8 --out benchmarks/MEMORY_MODES.md
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.memory import MODES, MemoryPlan, apply_plan, estimated_peak_gb
from pipelines.registry import get_variant
from pipelines.runner import EditInputs, EditRunner

# The real configs (transformer/config.json, text_encoder/config.json of Qwen/Qwen-Image-Edit).
TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rope_theta": 1000000.0,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
}
VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "window_size": 112,
}


@dataclass
class Row:
    mode: str
    quantize: str
    device: str
    steps: int
    seconds_per_step: float | None
    peak_gb: float | None
    estimated_peak_gb: float
    note: str = ""


def _materialise(module: Any, dtype: Any) -> Any:
    """Meta parameters -> CPU tensors with random values (N(0, 0.02)); buffers were built for real."""
    import torch

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type == "meta":
                data = torch.empty(param.shape, dtype=dtype, device="cpu").normal_(0.0, 0.02)
                sub._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    return module.to(dtype)


def build_real_size(variant: str, dtype: Any) -> Any:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from weights.tiny import SCHEDULER_CONFIG, SPECIAL_TOKENS, build_processor, build_tokenizer

    spec = get_variant(variant)
    tokenizer = build_tokenizer()  # the real tokenizer is not reachable offline; its size is irrelevant here
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}  # type: ignore[arg-type]
    # Parameters on the meta device (no memory), buffers (rotary tables) built for real.
    with init_empty_weights(include_buffers=False):
        transformer = QwenImageTransformer2DModel(**TRANSFORMER, zero_cond_t=spec.zero_cond_t)  # type: ignore[arg-type]
        config = Qwen2_5_VLConfig(
            text_config={**TEXT, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
            vision_config=VISION,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    vae = AutoencoderKLQwenImage().to(dtype)  # type: ignore[attr-defined]  # small (127 M): built for real
    transformer = _materialise(transformer, dtype)
    text_encoder = _materialise(text_encoder, dtype)
    return spec.pipeline_class()(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),  # type: ignore[arg-type]
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=build_processor(tokenizer),
    )


def run_mode(mode: str, quantize: str, *, tiny: bool, variant: str, steps: int, size: int) -> Row:
    import torch

    from weights.tiny import build_tiny_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    estimate = estimated_peak_gb(mode, quantize)
    if mode == "model-offload" and device == "cpu":
        return Row(mode, quantize, device, 0, None, None, estimate, "skipped: needs a GPU")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    pipe = build_tiny_pipeline(variant) if tiny else build_real_size(variant, dtype)
    if tiny:
        pipe.to(dtype)
    apply_plan(pipe, MemoryPlan(mode, quantize, estimate, "benchmark"), device)  # type: ignore[arg-type]
    pipe.set_progress_bar_config(disable=True)
    runner = EditRunner(pipe, get_variant(variant), device)
    image = Image.new("RGB", (size, size), (120, 80, 40))

    def once(n: int) -> float:
        inputs = EditInputs([image], "benchmark", seed=0, num_inference_steps=n, width=size, height=size)
        return runner(inputs).seconds

    once(2)  # warm-up: kernels, allocator, offload hooks
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # Two runs that differ only in step count: the difference is the denoising steps alone.
    short = once(2)
    full = once(steps + 2)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return Row(mode, quantize, device, steps, (full - short) / steps, peak, estimate, "tiny model" if tiny else "")


def table(rows: list[Row], device_name: str) -> str:
    lines = [
        f"GPU: {device_name}",
        "",
        "| mode | quantize | s/step | peak GB (measured) | peak GB (estimate) | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        sps = f"{r.seconds_per_step:.3f}" if r.seconds_per_step is not None else "-"
        peak = f"{r.peak_gb:.1f}" if r.peak_gb is not None else "-"
        lines.append(f"| {r.mode} | {r.quantize} | {sps} | {peak} | {r.estimated_peak_gb:.1f} | {r.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on whatever device (CI)")
    parser.add_argument("--variant", default="edit")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list; name:fp8 / name:int8 to quantize")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="output side in pixels (tiny: 64)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args(argv)
    size = 64 if args.tiny and args.size == 1024 else args.size
    rows = []
    for item in args.modes.split(","):
        mode, _, quantize = item.partition(":")
        row = run_mode(mode, quantize or "none", tiny=args.tiny, variant=args.variant, steps=args.steps, size=size)
        print(json.dumps(asdict(row)), flush=True)
        gc.collect()  # the mode's pipeline went out of scope: free it before the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows.append(row)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    text = table(rows, name)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
