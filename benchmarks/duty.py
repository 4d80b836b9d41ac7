"""Pipeline duty at saturation (``QWEN_EDIT_WORKER_OVERLAP``), overlap off vs on, side by side.

Duty is the share of wall time the pipeline is busy, from its first call to its last, with the
queue never empty (every job is queued before the worker starts). A serial worker leaves the GPU
idle while it claims the next job, fetches and decodes its inputs, encodes and stores the outputs;
with overlap those happen beside the pipeline.

One real worker (claim loop, executor, heartbeat, SQLite store, local files) in this process, fed
through the real API app in process, for each output size x format, running:

* ``fixed``: a stand-in pipeline with a fixed time per step (it sleeps, as a thread waiting on a
  GPU does), so that duty is measured without a GPU: 4 steps of 0.25 s is a 4-step Lightning
  edit at ~1 s an image on a big GPU;
* ``--model PATH``: the real pipeline (the tiny model by default with ``--tiny``, on ``--device``).

    python -m benchmarks.duty --out bench-out                      # fixed step time, all cells
    python -m benchmarks.duty --tiny --sizes 256,512 --out bench-out
    python -m benchmarks.duty --quick --out bench-out              # CI
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.overhead import ensure_model
from benchmarks.report import print_table, write_csv, write_json

FORMATS = ("jpeg", "png", "webp")
SIZES = (256, 512, 1024, 1536)


def photo(side: int, seed: int = 0) -> Any:
    """A photo-like image (smooth shapes, fine grain): what encoders meet in a model's output;
    flat colour would flatter PNG and WebP, white noise would punish them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack(
        [128 + 100 * np.sin(6 * x + 2 * y + seed), 128 + 90 * np.cos(5 * y - x), 128 + 80 * np.sin(3 * (x + y))], -1
    )
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


@dataclass
class Busy:
    """Pipeline busy intervals (perf_counter seconds), as the runner recorded them."""

    spans: list[tuple[float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, start: float, end: float) -> None:
        with self.lock:
            self.spans.append((start, end))

    def duty(self) -> float:
        if not self.spans:
            return float("nan")
        busy = sum(end - start for start, end in self.spans)
        wall = max(end for _, end in self.spans) - min(start for start, _ in self.spans)
        return busy / wall if wall > 0 else 1.0


class FixedStepRunner:
    """The worker's ``Runner`` with a fixed time per step and a photo-like output of the asked size."""

    def __init__(self, step_s: float, busy: Busy) -> None:
        self.step_s = step_s
        self.busy = busy
        self._outputs: dict[tuple[int, int], Any] = {}

    def batch_signature(self, inputs: Any) -> None:
        return None

    def run_batch(self, batch: list[Any], on_step: Any = None) -> list[Any]:
        return [self(inputs, on_step) for inputs in batch]

    def __call__(self, inputs: Any, on_step: Any = None) -> Any:
        from pipelines.runner import EditResult, RunCancelled

        start = time.perf_counter()
        size = (inputs.width or inputs.images[0].size[0], inputs.height or inputs.images[0].size[1])
        if size not in self._outputs:
            self._outputs[size] = photo(size[0]).resize(size)
        total = inputs.num_inference_steps
        for step in range(1, total + 1):
            time.sleep(self.step_s)
            if on_step is not None and not on_step(step, total):
                raise RunCancelled()
        image = self._outputs[size].copy()  # the "VAE decode": a fresh image for the encoder
        end = time.perf_counter()
        self.busy.add(start, end)
        return EditResult(images=[image], seconds=end - start)


class TimedRunner:
    """A real runner (``EditRunner``) whose calls are recorded as busy."""

    def __init__(self, runner: Any, busy: Busy) -> None:
        self.runner = runner
        self.busy = busy

    def batch_signature(self, inputs: Any) -> Any:
        return self.runner.batch_signature(inputs)

    def run_batch(self, batch: list[Any], on_step: Any = None) -> list[Any]:
        start = time.perf_counter()
        try:
            return list(self.runner.run_batch(batch, on_step))
        finally:
            self.busy.add(start, time.perf_counter())

    def __call__(self, inputs: Any, on_step: Any = None) -> Any:
        start = time.perf_counter()
        try:
            return self.runner(inputs, on_step)
        finally:
            self.busy.add(start, time.perf_counter())


def load_tiny_runner(model: Path, device: str) -> Any:
    from pipelines.loader import load_pipeline, resolve_dtype
    from pipelines.registry import get_variant
    from pipelines.runner import EditRunner

    variant = get_variant("edit")
    pipe = load_pipeline(str(model), variant, device=device, dtype=resolve_dtype("auto", device))
    return EditRunner(pipe, variant, device)


def measure(
    root: Path, runner: Any, busy: Busy, *, overlap: bool, side: int, fmt: str, jobs: int, steps: int
) -> dict[str, Any]:
    """Queue ``jobs`` edits through the API app, then let one worker run them all; duty and rate."""
    from fastapi.testclient import TestClient

    from pipelines.registry import get_variant
    from server.api.app import create_app
    from server.jobs.store import JobStore
    from server.settings import Settings
    from server.storage.factory import build_storage
    from server.worker.loop import Worker

    shutil.rmtree(root, ignore_errors=True)  # a fresh store: no job of an earlier run counts
    settings = Settings(
        data_dir=root,
        api_keys=["bench"],
        warmup=False,
        worker_overlap=overlap,
        poll_interval_s=0.05,
        default_steps=steps,
        speed_condition_cache=0,
    )
    buf = io.BytesIO()
    photo(side, seed=1).save(buf, format="JPEG", quality=90)
    image = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"prompt": "an edit", "image": image, "size": f"{side}*{side}", "output_format": fmt}
    with TestClient(create_app(settings)) as api:
        ids = []
        for i in range(jobs):
            r = api.post(
                "/api/v3/wavespeed-ai/qwen-image/edit",
                json={**body, "seed": i, "num_inference_steps": steps},
                headers={"Authorization": "Bearer bench"},
            )
            r.raise_for_status()
            ids.append(r.json()["data"]["id"])
    store = JobStore.open(settings)
    store.migrate()
    worker = Worker(settings, store, build_storage(settings), get_variant("edit"), "duty/0")
    busy.spans.clear()
    worker.start()
    thread = threading.Thread(target=worker.serve, args=(runner,), name="duty-worker", daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        while len(store.terminal_among(ids)) < jobs:
            time.sleep(0.05)
        finished = time.perf_counter()
    finally:
        worker.drain()
        thread.join(60)
    failed = [job.error for job in (store.get(pid) for pid in ids) if job is not None and job.error]
    store.close()
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed: {failed[0]}")
    return {"duty": busy.duty(), "images_s": jobs / (finished - started)}


def encode_ms(side: int, fmt: str) -> float:
    """The output encoder's own time for one image of this size (best of 3)."""
    from server.media.images import encode_image

    image = photo(side)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        encode_image(image, fmt)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.duty", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="256x256 only, 3 jobs a cell, short steps (CI)")
    p.add_argument("--sizes", help=f"output sides, comma-separated (default {','.join(map(str, SIZES))})")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--jobs", type=int, help="jobs per cell (default 8, quick 3)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--step-s", type=float, help="the stand-in pipeline's seconds per step (default 0.25)")
    p.add_argument("--tiny", action="store_true", help="the real pipeline on the tiny model instead")
    p.add_argument("--model", help="the real pipeline on this model folder instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([256] if args.quick else list(SIZES))
    formats = [f for f in args.formats.split(",") if f]
    jobs = args.jobs or (3 if args.quick else 8)
    step_s = args.step_s if args.step_s is not None else (0.02 if args.quick else 0.25)
    out = Path(args.out).resolve() / "duty"
    busy = Busy()
    if args.tiny or args.model:
        model = ensure_model(out.parent, args.model)
        runner: Any = TimedRunner(load_tiny_runner(model, args.device), busy)
        pipeline = f"{'tiny model' if not args.model else model.name}, {args.device}, {args.steps} steps"
    else:
        runner = FixedStepRunner(step_s, busy)
        pipeline = f"fixed {args.steps} x {step_s * 1000:.0f} ms steps"

    rows: list[dict[str, Any]] = []
    n = 0
    for side in sizes:
        for fmt in formats:
            row: dict[str, Any] = {"size": side, "format": fmt, "encode_ms": encode_ms(side, fmt)}
            for mode, overlap in (("off", False), ("on", True)):
                n += 1
                got = measure(
                    out / f"run{n}", runner, busy, overlap=overlap, side=side, fmt=fmt, jobs=jobs, steps=args.steps
                )
                row[f"duty_{mode}"], row[f"images_s_{mode}"] = got["duty"], got["images_s"]
            row["images_s_ratio"] = row["images_s_on"] / row["images_s_off"]
            rows.append(row)
    table = print_table(
        f"Pipeline duty at saturation ({pipeline}; {jobs} jobs a cell): overlap off vs on",
        ["output", "encode ms", "duty off", "duty on", "images/s off", "images/s on", "x images/s"],
        [
            [
                f"{r['size']}x{r['size']} {r['format']}",
                r["encode_ms"],
                r["duty_off"],
                r["duty_on"],
                r["images_s_off"],
                r["images_s_on"],
                r["images_s_ratio"],
            ]
            for r in rows
        ],
    )
    write_json(out / "duty.json", {"pipeline": pipeline, "jobs": jobs, "rows": rows, "table": table})
    write_csv(out / "duty.csv", rows)
    print(table, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
