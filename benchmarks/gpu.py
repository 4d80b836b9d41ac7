"""GPU pipeline benchmark: plain diffusers vs our runtime, side by side in one process.

The real-size architecture (MODEL.md: 60-layer transformer, Qwen2.5-VL-7B, the Qwen VAE) is built
from the tiny model's configs scaled to the real ones, with random bf16 weights (meta device, then
materialised on the GPU): timing and memory do not depend on the weights' values.

    python -m benchmarks.gpu --out bench-out                 # H100/H200: 1 MP, 50 steps CFG + Lightning 4/8
    python -m benchmarks.gpu --tiny --out bench-out          # the same code on the CPU, tiny model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.report import print_table, write_json

# The real transformer (Qwen/Qwen-Image-Edit transformer/config.json).
REAL_TRANSFORMER = dict(
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    in_channels=64,
    out_channels=16,
    patch_size=2,
    axes_dims_rope=(16, 56, 56),
)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks
LINEAR_FLOPS_PER_TOKEN = 13.59e9
ATTENTION_FLOPS_PER_TOKEN2 = 737_280


def pass_flops(tokens: int, layers_scale: float = 1.0) -> float:
    """MODEL.md's FLOPs model of one transformer pass over ``tokens`` tokens."""
    return (LINEAR_FLOPS_PER_TOKEN * tokens + ATTENTION_FLOPS_PER_TOKEN2 * tokens**2) * layers_scale


def build_pipeline(tiny_folder: Path, device: str, dtype: Any, real_size: bool) -> Any:
    """The pipeline from the tiny folder's tokenizer/scheduler; at real size, a 20 B transformer of random weights."""
    import torch
    from diffusers import QwenImageEditPipeline, QwenImageTransformer2DModel

    from pipelines.loader import load_pipeline
    from pipelines.registry import get_variant

    pipe = load_pipeline(str(tiny_folder), get_variant("edit"), device="cpu", dtype=dtype)
    if real_size:
        # Only the transformer is rebuilt at its real size: it is >95% of the step time. The text
        # encoder and VAE run once an image and keep their tiny form (noted in RESULTS.md).
        with torch.device("meta"):
            transformer = QwenImageTransformer2DModel(**REAL_TRANSFORMER)  # type: ignore[arg-type]
        transformer = transformer.to_empty(device=device).to(dtype)  # type: ignore[attr-defined]
        for param in transformer.parameters():
            torch.nn.init.normal_(param, std=0.02)
        pipe = QwenImageEditPipeline(
            scheduler=pipe.scheduler,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            processor=pipe.processor,
            transformer=transformer,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_case(pipe: Any, runtime: bool, steps: int, cfg: bool, size: int, device: str, repeats: int) -> dict[str, Any]:
    import torch

    from pipelines.registry import get_variant
    from pipelines.runner import EditInputs, EditRunner

    image = Image.new("RGB", (size, size), (120, 90, 60))
    inputs = EditInputs(
        images=[image],
        prompt="make the sky a sunset",
        seed=0,
        num_inference_steps=steps,
        true_cfg_scale=4.0 if cfg else 1.0,
        negative_prompt=" " if cfg else None,
        width=size,
        height=size,
    )
    transformer_calls = [0]
    hook = pipe.transformer.register_forward_hook(lambda *_: transformer_calls.__setitem__(0, transformer_calls[0] + 1))
    tokens = [0]

    def count_tokens(_mod: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        tokens[0] = kwargs["hidden_states"].shape[1] + kwargs["encoder_hidden_states"].shape[1]

    pre = pipe.transformer.register_forward_pre_hook(count_tokens, with_kwargs=True)

    def call() -> None:
        if runtime:
            EditRunner(pipe, get_variant("edit"), device)(inputs)
            return
        with torch.inference_mode():  # plain diffusers, as a user would call it
            pipe(
                image=image,
                prompt=inputs.prompt,
                negative_prompt=inputs.negative_prompt,
                true_cfg_scale=inputs.true_cfg_scale,
                num_inference_steps=steps,
                width=size,
                height=size,
                generator=torch.Generator("cpu").manual_seed(0),
            )

    try:
        call()  # warm-up, both sides alike: kernels, allocator (and our compile)
        times = []
        for _ in range(repeats):
            transformer_calls[0] = 0
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    finally:
        hook.remove()
        pre.remove()
    seconds = min(times)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    passes = steps * (2 if cfg else 1)
    return {
        "s_image": seconds,
        "s_step": seconds / steps,
        "peak_gib": peak_gib,
        "tokens": tokens[0],
        "passes": passes,
        "transformer_calls": transformer_calls[0],
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipelines.speed import SpeedConfig, apply_speed

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (the code path, not the numbers)")
    p.add_argument("--model", help="tiny model folder to take tokenizer/scheduler/VAE/text encoder from")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=1024, help="output side (1024: 1 MP)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--attention-backend", default="_flash_3")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    steps, size, repeats = (2, 64, 1) if args.tiny else (args.steps, args.size, args.repeats)
    folder = Path(args.model) if args.model else out / "tiny-edit"
    if not (folder / "model_index.json").is_file():
        from weights.tiny import build_tiny_model

        build_tiny_model(folder, "edit")
    gpu_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (tiny model)"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), float("nan")) * 1e12
    plain = build_pipeline(folder, device, dtype, real_size=not args.tiny)
    cases = [
        ("50-step true CFG", steps, True),
        ("Lightning 8-step", 8 if not args.tiny else 2, False),
        ("Lightning 4-step", 4 if not args.tiny else 2, False),
    ]
    rows: list[dict[str, Any]] = []
    for label, n, cfg in cases:
        rows.append(
            {"case": label, "runtime": "plain diffusers", **run_case(plain, False, n, cfg, size, device, repeats)}
        )
    config = SpeedConfig(
        batched_cfg=True,
        attention_backend="native" if args.tiny else args.attention_backend,
        compile=args.compile and not args.tiny,
        fp8=args.fp8 and not args.tiny,
        # Every repeat edits the same image: a condition cache would hit where plain diffusers
        # re-encodes. Off, so both rows pay for the encoders as a new image does.
        condition_cache=0,
    )
    report = apply_speed(plain, config, device)  # applied now: the plain rows above ran untouched
    for label, n, cfg in cases:
        rows.append(
            {
                "case": label,
                "runtime": "ours (" + ", ".join(report.applied) + ")",
                **run_case(plain, True, n, cfg, size, device, repeats),
            }
        )
    layers_scale = 1.0 if not args.tiny else len(plain.transformer.transformer_blocks) / 60
    for r in rows:
        ideal = pass_flops(r["tokens"], layers_scale) * r["passes"]
        # The FLOPs model is the real model's: on the tiny model these two columns mean nothing.
        r["tflops_s"] = ideal / r["s_image"] / 1e12 if not args.tiny else float("nan")
        r["mfu"] = ideal / r["s_image"] / peak if peak == peak else float("nan")
    table = print_table(
        f"{gpu_name}: edit {size}x{size}",
        ["case", "runtime", "s/step", "s/image", "peak GiB", "tokens", "TFLOP/s", "MFU"],
        [
            [r["case"], r["runtime"], r["s_step"], r["s_image"], r["peak_gib"], r["tokens"], r["tflops_s"], r["mfu"]]
            for r in rows
        ],
    )
    write_json(
        out / "gpu.json", {"device": gpu_name, "size": size, "rows": rows, "skipped": report.skipped, "table": table}
    )
    (out / "gpu.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
