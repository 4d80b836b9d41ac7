"""One request on several GPUs: seconds per true-CFG step and per-GPU memory of each parallel layout
(pipelines/layout.py), side by side with one GPU, in one run.

    python -m benchmarks.parallel --out bench-out                       # every layout the GPUs allow
    python -m benchmarks.parallel --layouts "none;cfg=2;cfg=2,ulysses=2" --out bench-out
    python -m benchmarks.gpu --parallel "cfg=2"                         # the same, from the GPU script
    python -m benchmarks.parallel --smoke --out bench-out               # 2 gloo ranks on the CPU

Each layout runs in fresh processes, one per GPU (torch.multiprocessing, NCCL; gloo for ``--smoke``),
through the same code the worker groups run (``RankContext``, ``apply_layout``: diffusers'
ContextParallelConfig / TensorParallelConfig, the CFG-parallel hook). Each rank builds the real
60-layer transformer with random bf16 weights on its GPU (pipelines/architecture.py; timing and
memory do not depend on the weights' values) and runs true-CFG steps as the pipeline calls it: the
prompt's pass, then the negative prompt's, on the latents of a 1 MP edit (4,096 output + 4,096
condition tokens, ~1,380 / 1,340 text tokens). The transformer is ~97 % of a 50-step edit, so the
ratio of its step times is the latency ratio. Per-GPU memory: peak allocated during the steps,
weights included (for tp: after sharding). ``--smoke`` runs the same code with one layer at the
real widths on the CPU, to prove the paths; its timings say nothing about GPUs.

Goal (the issue): 2 GPUs >= 1.8x lower latency at 1 MP, 50 steps, true CFG; 4 GPUs >= 3.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import print_table

DEFAULT_LAYOUTS = ("none", "cfg=2", "ulysses=2", "ring=2", "tp=2", "cfg=2,ulysses=2", "cfg=2,tp=2", "ulysses=4", "tp=4")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, layout_text: str, port: int, smoke: bool, steps: int, backend: str, result: str) -> None:
    import torch
    import torch.distributed as dist

    from pipelines.architecture import build_components
    from pipelines.layout import Layout
    from pipelines.parallel import RankContext, apply_layout
    from pipelines.registry import get_variant

    layout = Layout.parse(layout_text)
    device = "cpu" if smoke else f"cuda:{rank}"
    if not smoke:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "gloo" if smoke else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=layout.world_size
    )
    dtype = torch.float32 if smoke else torch.bfloat16
    parts = build_components(
        get_variant("edit"),
        "smoke" if smoke else "real",
        device=device,
        dtype=dtype,
        devices={"text_encoder": "meta", "vae": "meta"},
    )
    transformer = parts.transformer.eval()
    del parts
    if backend != "default":
        transformer.set_attention_backend(backend)
    pos_text, neg_text = (24, 20) if smoke else (1380, 1340)
    side = 8 if smoke else 64  # latent patches a side: 64 at 1024 px
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    pos, neg = (rand(1, pos_text, 3584), None), (rand(1, neg_text, 3584), None)
    encodings = iter((pos, neg))
    # The pipeline's view of the transformer: encode_prompt for the two prompts, then per step the
    # two calls; the hooks (CFG-parallel, sequence padding, context/tensor parallel) see exactly that.
    pipe = type("Pipe", (), {})()
    pipe.transformer = transformer
    pipe.encode_prompt = lambda: next(encodings)
    if layout.parallel:
        apply_layout(pipe, RankContext.create(layout, rank, device))
    pipe.encode_prompt(), pipe.encode_prompt()
    latents = rand(1, 2 * side * side, 64)
    shapes = [[(1, side, side), (1, side, side)]]

    def step() -> None:
        t = torch.full((1,), 0.5, device=device, dtype=dtype)
        for embeds, mask in (pos, neg):
            transformer(
                hidden_states=latents,
                timestep=t,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=shapes,
                return_dict=False,
            )

    def sync() -> None:
        if not smoke:
            torch.cuda.synchronize()
        dist.barrier()

    with torch.inference_mode():
        step()  # warm-up: kernels chosen, communicators set up
        sync()
        if not smoke:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if not smoke else None
    peaks: list[Any] = [None] * layout.world_size
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        Path(result).write_text(json.dumps({"s_per_cfg_step": seconds, "peak_gib": peaks}))
    dist.destroy_process_group()


def run_layout(layout_text: str, smoke: bool, steps: int, backend: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from pipelines.layout import Layout
    from pipelines.parallel import runnable

    layout = Layout.parse(layout_text)
    row: dict[str, Any] = {"layout": str(layout), "gpus": layout.world_size}
    why = runnable(layout, "cpu" if smoke else "cuda", backend)
    if why:
        return row | {"error": why}
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        try:
            mp.spawn(
                _rank,
                args=(layout_text, _free_port(), smoke, steps, backend, result),
                nprocs=layout.world_size,
                join=True,
            )
        except Exception as exc:
            return row | {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"}
        return row | json.loads(Path(result).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", help="layouts separated by ';', each like cfg=2,ulysses=2 (default: all that fit)")
    parser.add_argument("--steps", type=int, default=5, help="timed true-CFG steps per layout")
    parser.add_argument("--attention-backend", default="default", help="diffusers backend (ring needs flash/sage)")
    parser.add_argument("--smoke", action="store_true", help="2 gloo ranks on the CPU, one layer: the code paths")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)

    if args.smoke:
        layouts = ["none", "cfg=2", "ulysses=2", "tp=2"]
        gpus = 2
    else:
        import torch

        gpus = torch.cuda.device_count()
        if gpus < 2:
            print(f"benchmarks.parallel: {gpus} GPU(s) here; a parallel layout needs 2 or more", file=sys.stderr)
            return 2
        layouts = list(DEFAULT_LAYOUTS)
    if args.layouts:
        layouts = [t.strip() for t in args.layouts.split(";") if t.strip()]
    from pipelines.layout import Layout

    layouts = [t for t in layouts if Layout.parse(t).world_size <= gpus]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for text in layouts:
        row = run_layout(text, args.smoke, max(1, args.steps), args.attention_backend)
        rows.append(row)
        with open(args.out / "parallel.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{row['layout']}: {row.get('s_per_cfg_step', row.get('error'))}", file=sys.stderr)
    base = next((r["s_per_cfg_step"] for r in rows if r["layout"] == "none" and "s_per_cfg_step" in r), None)
    columns = ["layout", "GPUs", "s/CFG step", "vs 1 GPU", "50 steps s", "peak GiB/GPU", "note"]
    table = []
    for r in rows:
        seconds = r.get("s_per_cfg_step")
        peaks = [p for p in r.get("peak_gib", []) if p is not None]
        table.append(
            [
                r["layout"],
                r["gpus"],
                seconds,
                f"{base / seconds:.2f}x" if base and seconds else None,
                50 * seconds if seconds else None,
                max(peaks) if peaks else None,
                r.get("error", ""),
            ]
        )
    kind = "CPU smoke: code paths only" if args.smoke else "GPU"
    markdown = print_table(f"parallel layouts: the transformer per true-CFG step at 1 MP ({kind})", columns, table)
    (args.out / "parallel.md").write_text(markdown + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
