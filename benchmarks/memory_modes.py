"""Phase 3 of the truth table: each memory mode in a fresh subprocess, on the real architecture with
random weights, placed by the server's own code (pipelines.memory.apply_plan) and run through its
runner: seconds per step (step differencing), the device's peak, the process's host RAM peak,
beside the planner's estimates (pipelines/plan.py).

    python -m benchmarks.memory_modes --out bench-out                 # every mode, one subprocess each (GPU)
    python -m benchmarks.memory_modes --one group-block:none --json   # one mode in this process
    python -m benchmarks.memory_modes --smoke --out bench-out         # the same on the CPU, real widths
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import dumps

MODES = ("full:none", "text-encoder-offload:none", "model-offload:none", "group-block:none", "group-leaf:none")
# On the CPU smoke run, the mode with both streaming kinds (the transformer block by block, the
# text encoder leaf by leaf) beside phase 2's resident pipeline: a step at real width costs ~13 s.
SMOKE_MODES = ("group-block:none",)
QUANTIZED = ("full:fp8", "text-encoder-offload:fp8", "group-block:fp8", "full:int8")


def measure_one(mode: str, quantize: str, smoke: bool) -> dict[str, Any]:
    """Build, place and run one mode in this process; its row."""
    import torch
    from PIL import Image

    from pipelines.architecture import build_pipeline
    from pipelines.memory import MemoryPlan, apply_plan, quantize_transformer, resident_on
    from pipelines.plan import estimate, sizes_of
    from pipelines.registry import get_variant
    from pipelines.runner import EditInputs, EditRunner

    variant = get_variant("edit")
    device = "cpu" if smoke else "cuda"
    row: dict[str, Any] = {"mode": mode, "quantize": quantize}
    if mode == "model-offload" and device == "cpu":
        return {**row, "error": "needs a GPU (diffusers' enable_model_cpu_offload refuses the CPU)"}
    dtype = torch.float32 if smoke else torch.bfloat16
    plan = MemoryPlan(mode, quantize, None, "benchmark")  # type: ignore[arg-type]
    # Resident components are built on the device, streamed ones in host RAM, as the loader places them.
    pipe = build_pipeline(
        variant, "smoke" if smoke else "real", device="cpu", dtype=dtype, devices=resident_on(plan, device)
    )
    # The planner's estimate for what was built (the real sizes on a GPU; the smoke ones, in fp32, on the CPU).
    est = estimate(mode, quantize, sizes_of(pipe.transformer, pipe.text_encoder, pipe.vae))
    row.update(estimated_peak_gb=est.peak_gb, estimated_host_ram_gb=est.host_ram_gb)
    if quantize != "none":
        quantize_transformer(pipe.transformer, quantize)  # what the loader's TorchAoConfig does at load
    apply_plan(pipe, plan, device)
    runner = EditRunner(pipe, variant, device)
    size = 256 if smoke else 1024
    image = Image.new("RGB", (size, size), (120, 80, 40))
    short, long = 2, 4

    def once(steps: int) -> float:
        inputs = EditInputs([image], "benchmark", seed=0, num_inference_steps=steps, width=size, height=size)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        runner(inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    if smoke:  # the code path, once: a step at real width costs ~10 s on a CPU
        row["note"] = f"the code path: 1 step in {once(1):.0f} s on the CPU"
        row["host_ram_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        return row
    once(short)  # warm-up: kernels, the allocator, the offload hooks' first onload (its peak counts)
    a, b = once(short), once(long)
    free, total = torch.cuda.mem_get_info()
    row["s_per_step"] = (b - a) / (long - short)
    row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    row["reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    row["device_used_gb"] = (total - free) / 1e9
    row["host_ram_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return row


def phase_memory(run: Any) -> None:
    """Every mode (then the quantized ones) in a subprocess of its own, while the budget lasts."""
    import importlib.util

    items = list(SMOKE_MODES if run.smoke else MODES)
    if not run.smoke and importlib.util.find_spec("torchao") is not None:
        items += list(QUANTIZED)
    for item in items:
        mode, _, quantize = item.partition(":")
        left = run.left()
        if left < 90:
            run.record("3-memory", mode=mode, quantize=quantize, error="budget spent")
            continue
        cmd = [sys.executable, "-m", "benchmarks.memory_modes", "--one", item, "--json"]
        cmd += ["--smoke"] if run.smoke else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left - 30)
        except subprocess.TimeoutExpired:
            run.record("3-memory", mode=mode, quantize=quantize, error="timed out within the budget")
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            run.record("3-memory", mode=mode, quantize=quantize, error=f"exit {proc.returncode}: {tail[0][:300]}")
            continue
        run.record("3-memory", **json.loads(lines[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help="mode:quantize, measured in this process")
    parser.add_argument("--json", action="store_true", help="print the row as one JSON line")
    parser.add_argument("--smoke", action="store_true", help="on the CPU, real widths, 1-2 layers")
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    if args.one:
        mode, _, quantize = args.one.partition(":")
        try:
            row = measure_one(mode, quantize or "none", args.smoke)
        except Exception as exc:  # one mode's failure is its row, not the table's end
            row = {"mode": mode, "quantize": quantize or "none", "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(dumps(row) if args.json else row, flush=True)
        return 0
    from benchmarks.gpu import Run, tables

    run = Run(smoke=args.smoke, out=args.out.resolve(), budget_s=args.budget_s)
    phase_memory(run)
    tables(run.rows, run.describe(), echo=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
