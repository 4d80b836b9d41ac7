"""Dynamic batching (``QWEN_EDIT_BATCH_MAX_SIZE``), measured in one run, side by side:

1. direct: N same-size edits called one by one vs ``EditRunner.run_batch`` in groups of B;
2. server: a burst of N same-size jobs (all submitted at once, async + polling) against a server
   with batching off vs on (``batch_max_size`` B, ``batch_wait_ms`` W): images per second and
   p50/p99 end-to-end latency, as ratios to batching off.

    python -m benchmarks.batching --out bench-out                       # tiny model, CPU
    python -m benchmarks.batching --model /models/Qwen-Image-Edit --device cuda --size 1024 --steps 50

Whether batching pays depends on the device: a GPU already saturated by one 1 MP image gains
little, while small images and few-step presets leave room. Hence a setting, off by default.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.client import cli as bench
from benchmarks.client.inputs import square_image
from benchmarks.overhead import ensure_model, free_port, start_server, stop_server
from benchmarks.report import print_table, square_side, write_csv, write_json


def direct(model: Path, device: str, jobs: int, batch: int, steps: int, size: int) -> dict[str, float]:
    """Seconds for ``jobs`` edits one by one and in batches of ``batch``, in this process."""
    from PIL import Image

    from pipelines.loader import load_pipeline, resolve_dtype
    from pipelines.registry import get_variant
    from pipelines.runner import EditInputs, EditRunner
    from pipelines.speed import SpeedConfig, apply_speed

    variant = get_variant("edit")
    pipe = load_pipeline(str(model), variant, device=device, dtype=resolve_dtype("auto", device))
    apply_speed(pipe, SpeedConfig(condition_cache=0), device)  # every job encodes its image, both ways
    runner = EditRunner(pipe, variant, device)
    raw = square_image()
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    inputs = [
        EditInputs(
            images=[image], prompt=f"edit number {i}", seed=i, num_inference_steps=steps, width=size, height=size
        )
        for i in range(jobs)
    ]
    runner(inputs[0])  # warm up, as the worker does
    runner.run_batch(inputs[:batch])
    started = time.perf_counter()
    for one in inputs:
        runner(one)
    alone = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, jobs, batch):
        runner.run_batch(inputs[i : i + batch])
    together = time.perf_counter() - started
    return {"alone_s": alone, "batched_s": together}


def burst(url: str, jobs: int, size: int, out: Path) -> dict[str, Any]:
    """``jobs`` jobs at once through qwen-edit bench (closed loop, C = jobs), all on one image so
    that they can share a batch; until completed, without downloading the output."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "square.png").write_bytes(square_image())
    (out / "one.jsonl").write_text(json.dumps({"prompt": "make the red square blue", "image": "square.png"}) + "\n")
    # Polls every 0.5 s (the Python SDK's is 1 s): N clients polling faster would take a share of a
    # CPU machine's cores from the worker they are measuring.
    rc = bench.main(
        [
            *("--url", url, "-n", str(jobs), "-c", str(jobs), "--size", f"{size}*{size}", "--num-warmups", "0"),
            *("--dataset", str(out / "one.jsonl"), "--no-download", "--poll-interval", "0.5"),
            *("--fast-poll-interval", "0.5", "--out", str(out), "--name", "client", "--quiet"),
        ]
    )
    result: dict[str, Any] = json.loads((out / "client.json").read_text())["results"][0]
    if rc not in (0, 1):
        raise RuntimeError(f"qwen-edit bench against {url} ended with {rc}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.batching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a handful of jobs (CI)")
    p.add_argument("--jobs", type=int, help="jobs per configuration (default 16, quick 4)")
    p.add_argument("--batch", type=int, default=4, help="batch_max_size when batching is on")
    p.add_argument("--wait-ms", type=int, default=200, help="batch_wait_ms when batching is on")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=square_side, default=256, help="square output size: 256 or 256*256")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="model folder (default: a tiny model built under --out)")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    jobs = args.jobs or (4 if args.quick else 16)
    batch = min(args.batch, jobs)
    out = Path(args.out).resolve() / "batching"
    model = ensure_model(out.parent, args.model)

    d = direct(model, args.device, jobs, batch, args.steps, args.size)
    runs: dict[str, dict[str, Any]] = {}
    for name, env in (
        ("off", {"QWEN_EDIT_BATCH_MAX_SIZE": "1"}),
        ("on", {"QWEN_EDIT_BATCH_MAX_SIZE": str(batch), "QWEN_EDIT_BATCH_WAIT_MS": str(args.wait_ms)}),
    ):
        port = free_port()
        env["QWEN_EDIT_DEVICE"] = args.device
        # Every job sends the same image: without this the server would skip the encoders that
        # the direct rows pay for, and the rows would not compare.
        env["QWEN_EDIT_SPEED_CONDITION_CACHE"] = "0"
        proc = start_server(out / f"server-{name}", model, port, args.steps, env)
        try:
            runs[name] = burst(f"http://127.0.0.1:{port}", jobs, args.size, out / f"client-{name}")
        finally:
            stop_server(proc)

    rows: list[dict[str, Any]] = [
        {"path": "direct, one by one", "images_s": jobs / d["alone_s"], "p50_ms": None, "p99_ms": None},
        {"path": f"direct, batches of {batch}", "images_s": jobs / d["batched_s"], "p50_ms": None, "p99_ms": None},
    ]
    for name, label in (("off", "server, batching off"), ("on", f"server, batch {batch}, wait {args.wait_ms} ms")):
        s = runs[name]
        if s["completed"] != jobs:
            raise RuntimeError(f"{label}: {s['completed']} of {jobs} jobs completed")
        rows.append(
            {
                "path": label,
                "images_s": s["request_throughput"],
                "p50_ms": s["median_e2el_ms"],
                "p99_ms": s["p99_e2el_ms"],
            }
        )
    rows[1]["images_s_ratio"] = rows[1]["images_s"] / rows[0]["images_s"]
    rows[3]["images_s_ratio"] = rows[3]["images_s"] / rows[2]["images_s"]
    rows[3]["p50_ratio"] = rows[3]["p50_ms"] / rows[2]["p50_ms"]
    table = print_table(
        f"Dynamic batching, {args.device}, {jobs} jobs at once, {args.steps} steps, {args.size}x{args.size}",
        ["path", "images/s", "x images/s", "e2e p50 ms", "x p50", "e2e p99 ms"],
        [
            [r["path"], r["images_s"], r.get("images_s_ratio", 1.0), r["p50_ms"], r.get("p50_ratio"), r["p99_ms"]]
            for r in rows
        ],
    )
    write_json(
        out / "batching.json", {"jobs": jobs, "batch": batch, "wait_ms": args.wait_ms, "rows": rows, "table": table}
    )
    write_csv(out / "batching.csv", rows)
    (out / "batching.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
