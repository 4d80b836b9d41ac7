"""The GPU truth table, in one call: what every speed setting and memory mode really costs.

    python -m benchmarks.gpu --budget-s 540 --out bench-out    # one H100/H200, under 10 minutes
    python -m benchmarks.gpu --smoke --out bench-out           # every phase on the CPU, real widths, minutes

The real architecture (pipelines/architecture.py) with random bf16 weights, built straight on the
GPU; timing and memory do not depend on the weights' values.

1. The 60-layer transformer alone, at the tokens of a 1 MP edit: seconds per true-CFG step for each
   attention backend available here, as two batch-1 passes, as batched CFG (padded, with a mask:
   some backends refuse masks) and as batch 2 without a mask; then regional compile and fp8.
2. The whole pipeline (real-size text encoder and VAE) resident on the GPU: plain diffusers against
   ours at 1 MP, 50 steps with true CFG and the Lightning 4/8 presets. Seconds per step are the median gap
   between step ends in one call (a device sync at each), the rest of the call is the fixed cost;
   peak memory allocated, reserved and used on the device; MFU at 790 TFLOP/s (MODEL.md's dense
   bf16 figure) and 989 (the data sheet's).
3. Every memory mode in a fresh subprocess (benchmarks/memory_modes.py): seconds per step, device
   peak, host RAM peak.

Rows are appended to ``<out>/gpu.jsonl`` as they are measured and the tables rewritten after each,
so a run cut short keeps what it measured; a phase stops when the budget left is too small for it.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.report import dumps, print_table

LINEAR_FLOPS_PER_TOKEN = 13.59e9  # MODEL.md, all 60 layers
ATTENTION_FLOPS_PER_TOKEN2 = 737_280
PEAKS_TFLOPS = (790.0, 989.0)  # dense bf16: MODEL.md's figure, and the H100/H200 data sheet's
BACKENDS = ("native", "_native_cudnn", "_native_flash", "flash", "_flash_3", "sage")


def pass_flops(tokens: int, layers: int = 60) -> float:
    """MODEL.md's FLOPs model of one transformer pass over ``tokens`` tokens (scaled to ``layers``)."""
    return (LINEAR_FLOPS_PER_TOKEN * tokens + ATTENTION_FLOPS_PER_TOKEN2 * tokens**2) * layers / 60


@dataclass
class Run:
    """One benchmark run's settings and what it wrote."""

    smoke: bool
    out: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def record(self, phase: str, **row: Any) -> None:
        row = {"phase": phase, **row}
        self.rows.append(row)
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "gpu.jsonl").open("a") as fh:
            fh.write(dumps(row) + "\n")
        print(dumps(row), flush=True)
        (self.out / "gpu.md").write_text(tables(self.rows, self.describe()))

    def describe(self) -> str:
        import torch

        if self.smoke:
            return "CPU smoke run (real widths, 1-2 layers per component): code paths, not speeds"
        props = torch.cuda.get_device_properties(0)
        return (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
        )


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Any, device: str, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, after one untimed warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - started)
    return best


# --- phase 1: the transformer alone ----------------------------------------------------------------


def phase_transformer(run: Run) -> tuple[str, bool]:
    """Time the transformer per attention backend; returns the fastest backend that worked, and
    whether batched CFG beat two batch-1 passes on it (phase 2 runs ours with what won)."""
    import torch

    from pipelines.architecture import build_components
    from pipelines.registry import get_variant
    from pipelines.speed import SpeedReport, compile_blocks, fp8_unavailable_reason

    dtype = torch.float32 if run.smoke else torch.bfloat16
    parts = build_components(get_variant("edit"), "smoke" if run.smoke else "real", device=run.device, dtype=dtype)
    transformer = parts.transformer.eval()
    layers = len(transformer.transformer_blocks)
    del parts
    side = 8 if run.smoke else 64  # latent patches a side: 64 at 1024 px (16 px a patch)
    txt_pos, txt_neg = (24, 20) if run.smoke else (1380, 1340)  # a 1 MP image's ~1,337 tokens, prompt and " "
    n_img = 2 * side * side  # the output and the condition
    dev = run.device

    def inputs(batch: int, text: int, mask: bool) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, n_img, 64, device=dev, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, text, 3584, device=dev, dtype=dtype),
            "encoder_hidden_states_mask": torch.ones(batch, text, device=dev, dtype=torch.bool) if mask else None,
            "timestep": torch.full((batch,), 0.5, device=dev, dtype=dtype),
            "img_shapes": [[(1, side, side), (1, side, side)]] * batch,
            "return_dict": False,
        }

    pos, neg = inputs(1, txt_pos, False), inputs(1, txt_neg, False)
    padded = inputs(2, txt_pos, True)
    padded["encoder_hidden_states_mask"][1, txt_neg:] = False
    equal = inputs(2, txt_pos, False)
    repeats = 1 if run.smoke else 3
    flops_step = pass_flops(n_img + txt_pos, layers) + pass_flops(n_img + txt_neg, layers)
    best: tuple[float, str, bool] = (float("inf"), "native", False)

    def measure(label: str, backend: str, fn: Any) -> float | None:
        try:
            with torch.inference_mode():
                seconds = timed(fn, dev, repeats)
        except Exception as exc:
            run.record("1-transformer", backend=backend, case=label, error=f"{type(exc).__name__}: {exc}"[:300])
            return None
        run.record(
            "1-transformer",
            backend=backend,
            case=label,
            s_per_cfg_step=seconds,
            tflops=flops_step / seconds / 1e12,
            **{f"mfu_{int(p)}": flops_step / seconds / (p * 1e12) for p in PEAKS_TFLOPS},
        )
        return seconds

    for backend in BACKENDS if not run.smoke else ("native", "_native_flash"):
        if run.left() < 30:
            run.record("1-transformer", backend=backend, case="skipped", error="budget spent")
            break
        try:
            transformer.set_attention_backend(backend)
        except Exception as exc:
            run.record("1-transformer", backend=backend, case="unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        two = measure("two batch-1 passes", backend, lambda: (transformer(**pos), transformer(**neg)))
        batched = measure("batched CFG (mask)", backend, lambda: transformer(**padded))
        measure("batch 2, no mask", backend, lambda: transformer(**equal))
        for seconds, is_batched in ((two, False), (batched, True)):
            if seconds is not None and seconds < best[0]:
                best = (seconds, backend, is_batched)
    transformer.set_attention_backend(best[1])
    if run.smoke:
        run.record("1-transformer", backend=best[1], case="regional compile", error="not on the CPU smoke run")
    elif run.left() > 120:
        report = SpeedReport()
        compile_blocks(transformer, report)
        measure("regional compile", best[1], lambda: (transformer(**pos), transformer(**neg)))
    reason = fp8_unavailable_reason(dev)
    if reason is None and run.left() > 60:
        from pipelines.memory import quantize_transformer

        quantize_transformer(transformer, "fp8", fp8_dynamic=True)
        measure("fp8 (dynamic activations)", best[1], lambda: (transformer(**pos), transformer(**neg)))
    else:
        run.record("1-transformer", backend=best[1], case="fp8", error=reason or "budget spent")
    run.record(
        "1-transformer",
        backend=best[1],
        case="fastest",
        batched_cfg=best[2],
        s_per_cfg_step=best[0],
        note="phase 2 runs ours with this" + (" and batched CFG" if best[2] else " and two CFG passes"),
    )
    return best[1], best[2]


def free_device() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- phase 2: the whole pipeline, plain diffusers against ours ---------------------------------------


def phase_pipeline(run: Run, backend: str, batched_cfg: bool = False) -> None:
    import torch
    from PIL import Image

    from pipelines.architecture import build_pipeline
    from pipelines.lightning import use_lightning_scheduler
    from pipelines.registry import get_variant
    from pipelines.runner import EditInputs, EditRunner
    from pipelines.speed import SpeedConfig, apply_speed, reset_attention_backend

    variant = get_variant("edit")
    dtype = torch.float32 if run.smoke else torch.bfloat16
    pipe = build_pipeline(variant, "smoke" if run.smoke else "real", device=run.device, dtype=dtype)
    layers = len(pipe.transformer.transformer_blocks)
    size = 256 if run.smoke else 1024
    image = Image.new("RGB", (size, size), (120, 90, 60))
    tokens = [0]

    def count(_mod: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        tokens[0] = kwargs["hidden_states"].shape[1] + kwargs["encoder_hidden_states"].shape[1]

    pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    # (label, CFG, steps run, the step count reported). One call per case: the time of each step is
    # the gap between two step ends (a device sync at each), so per step is the median gap from the
    # second step on, and the fixed part (text and VAE encoding, the first step's extra, decoding) is
    # the rest of the call. On the CPU smoke run a step of the 1-layer transformer at real width
    # costs ~10-20 s: the Lightning case alone, two steps.
    cases = [("Lightning 4/8-step", False, 2 if run.smoke else 8, 4)]
    if not run.smoke:
        cases.insert(0, ("50-step true CFG", True, 6, 50))

    def one(ours: bool, cfg: bool, steps: int) -> dict[str, Any]:
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
        if run.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        ends: list[float] = []

        def step_end() -> None:
            sync(run.device)
            ends.append(time.perf_counter())

        def on_step(step: int, _total: int) -> bool:
            if step > 0:  # 0 is the call before the first step
                step_end()
            return True  # go on

        sync(run.device)
        started = time.perf_counter()
        if ours:
            EditRunner(pipe, variant, run.device)(inputs, on_step)
        else:

            def callback(_pipe: Any, _step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                step_end()
                return kwargs

            with torch.inference_mode():  # plain diffusers, as its documentation calls it
                pipe(
                    image=image,
                    prompt=inputs.prompt,
                    negative_prompt=inputs.negative_prompt,
                    true_cfg_scale=inputs.true_cfg_scale,
                    num_inference_steps=steps,
                    width=size,
                    height=size,
                    generator=torch.Generator("cpu").manual_seed(0),
                    callback_on_step_end=callback,
                )
        sync(run.device)
        seconds = time.perf_counter() - started
        assert len(ends) == steps, f"{len(ends)} step ends for {steps} steps"
        per_step = statistics.median(b - a for a, b in itertools.pairwise(ends))
        timing = {"seconds": seconds, "s_per_step": per_step, "fixed_s": seconds - steps * per_step}
        if not run.device.startswith("cuda"):
            return timing
        free, total = torch.cuda.mem_get_info()
        return {
            **timing,
            "allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "device_used_gib": (total - free) / 2**30,
        }

    # Phase 1 left its backend active process-wide (diffusers): plain diffusers runs on the default.
    reset_attention_backend(pipe.transformer)
    for runtime in ("plain diffusers", "ours"):
        ours = runtime == "ours"
        if ours:
            speed = SpeedConfig(
                attention_backend=backend, compile=not run.smoke, batched_cfg=batched_cfg, condition_cache=0
            )
            applied = apply_speed(pipe, speed, run.device).applied
            runtime = "ours (" + ", ".join(applied) + ")"
        for label, cfg, steps, reported in cases:
            if label.startswith("Lightning"):
                use_lightning_scheduler(pipe)
            if run.left() < 60:
                run.record("2-pipeline", runtime=runtime, case=label, error="budget spent")
                continue
            if not run.smoke:
                one(ours, cfg, 2)  # warm-up: kernels, the allocator, a compile
            got = one(ours, cfg, steps)
            per_step, fixed = got["s_per_step"], got["fixed_s"]
            flops = pass_flops(tokens[0], layers) * (2 if cfg else 1)
            row: dict[str, Any] = {
                "runtime": runtime,
                "case": label,
                "s_per_step": per_step,
                "fixed_s": fixed,
                f"s_image_{reported}_steps": fixed + reported * per_step,
                "tokens": tokens[0],
                **{k: v for k, v in got.items() if k not in ("seconds", "s_per_step", "fixed_s")},
                **{f"mfu_{int(p)}": flops / per_step / (p * 1e12) if per_step > 0 else None for p in PEAKS_TFLOPS},
            }
            if label.startswith("Lightning"):
                row["s_image_8_steps"] = fixed + 8 * per_step
            run.record("2-pipeline", **row)


# --- tables -------------------------------------------------------------------------------------------


def _note(r: dict[str, Any]) -> Any:
    return r.get("error", r.get("note", ""))


# Each phase's table: (phase, title, [(column, cell of a row)]).
TABLES: list[tuple[str, str, list[tuple[str, Any]]]] = [
    (
        "1-transformer",
        "1. transformer alone (1 MP edit tokens), s per true-CFG step",
        [
            ("backend", lambda r: r["backend"]),
            ("case", lambda r: r["case"]),
            ("s/CFG step", lambda r: r.get("s_per_cfg_step")),
            ("TFLOP/s", lambda r: r.get("tflops")),
            ("MFU @790", lambda r: r.get("mfu_790")),
            ("MFU @989", lambda r: r.get("mfu_989")),
            ("note", _note),
        ],
    ),
    (
        "2-pipeline",
        "2. whole pipeline, full mode",
        [
            ("case", lambda r: r["case"]),
            ("runtime", lambda r: r["runtime"]),
            ("s/step", lambda r: r.get("s_per_step")),
            ("fixed s", lambda r: r.get("fixed_s")),
            ("s/image", lambda r: r.get("s_image_50_steps", r.get("s_image_4_steps"))),
            ("tokens", lambda r: r.get("tokens")),
            ("alloc GiB", lambda r: r.get("allocated_gib")),
            ("reserved GiB", lambda r: r.get("reserved_gib")),
            ("used GiB", lambda r: r.get("device_used_gib")),
            ("MFU @790", lambda r: r.get("mfu_790")),
            ("MFU @989", lambda r: r.get("mfu_989")),
            ("note", lambda r: r.get("error", "")),
        ],
    ),
    (
        "3-memory",
        "3. memory modes (each in a fresh process)",
        [
            ("mode", lambda r: r["mode"]),
            ("quantize", lambda r: r["quantize"]),
            ("s/step", lambda r: r.get("s_per_step")),
            ("device peak GB", lambda r: r.get("peak_gb")),
            ("estimate GB", lambda r: r.get("estimated_peak_gb")),
            ("reserved GB", lambda r: r.get("reserved_gb")),
            ("used GB", lambda r: r.get("device_used_gb")),
            ("host RAM GB", lambda r: r.get("host_ram_gb")),
            ("host estimate GB", lambda r: r.get("estimated_host_ram_gb")),
            ("note", _note),
        ],
    ),
]


def tables(rows: list[dict[str, Any]], device: str, echo: bool = False) -> str:
    """The three tables as Markdown (printed too where ``echo``)."""
    import io

    from rich.console import Console

    console = None if echo else Console(file=io.StringIO())
    parts = [f"Device: {device}"]
    for phase, title, columns in TABLES:
        mine = [r for r in rows if r["phase"] == phase]
        if mine:
            cells = [[cell(r) for _, cell in columns] for r in mine]
            parts.append(f"### {title}\n\n" + print_table(title, [name for name, _ in columns], cells, console))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="every phase on the CPU at the real widths, 1-2 layers")
    p.add_argument("--budget-s", type=float, help="stop starting new work after this long (540; smoke: 1200)")
    p.add_argument("--phases", default="1,2,3", help="which phases, e.g. 1,2")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument(
        "--parallel", help="instead: these parallel layouts against one GPU, ';'-separated (benchmarks/parallel.py)"
    )
    args = p.parse_args(argv)
    if args.parallel:
        from benchmarks.parallel import main as parallel_main

        return parallel_main(["--layouts", f"none;{args.parallel}", "--out", str(args.out)] + ["--smoke"] * args.smoke)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA GPU here; --smoke runs every phase on the CPU", file=sys.stderr)
        return 2
    budget = args.budget_s if args.budget_s is not None else (1200.0 if args.smoke else 540.0)
    run = Run(smoke=args.smoke, out=args.out.resolve(), budget_s=budget)
    (run.out / "gpu.jsonl").unlink(missing_ok=True)
    phases = set(args.phases.split(","))
    backend, batched_cfg = phase_transformer(run) if "1" in phases else ("native", False)
    free_device()  # the phase's models went with its frame
    if "2" in phases:
        phase_pipeline(run, backend, batched_cfg)
        free_device()
    if "3" in phases:
        from benchmarks.memory_modes import phase_memory

        phase_memory(run)
    tables(run.rows, run.describe(), echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
