"""Latency benchmark client for any v3-compatible endpoint (this server, or the hosted API).

    python -m benchmarks.client --url http://127.0.0.1:8000 --key KEY -n 50 -c 1 4 8 --mode async

Per job it records the queue wait (submit until the job was first seen ``processing``, or for
sync mode end-to-end minus the server's ``timings.inference``), the inference time the server
reports, and the end-to-end latency; it prints p50/p90/p99 and throughput per concurrency and
writes ``<out>/client.json``, ``client.csv`` and ``client.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from tqdm import tqdm

from benchmarks.report import percentiles, print_table, write_csv, write_json

DEFAULT_MODEL = "wavespeed-ai/qwen-image/edit"


@dataclass
class JobTiming:
    concurrency: int
    index: int
    id: str
    status: str
    e2e_ms: float
    queue_ms: float | None
    inference_ms: float
    polls: int
    error: str = ""


def test_image(size: int = 64) -> str:
    img = Image.new("RGB", (size, size), (200, 40, 40))
    for x in range(0, size, 8):
        for y in range(size):
            img.putpixel((x, y), (20, 20, 220))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(args: argparse.Namespace, index: int, sync: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": args.prompt,
        "image": args.image or test_image(),
        "seed": index,
        "enable_sync_mode": sync,
        "enable_base64_output": False,
    }
    if args.size:
        body["size"] = args.size
    if args.steps:
        body["num_inference_steps"] = args.steps
    return body


async def run_job(client: httpx.AsyncClient, args: argparse.Namespace, concurrency: int, index: int) -> JobTiming:
    sync = args.mode == "sync"
    started = time.perf_counter()
    queue_ms: float | None = None
    polls = 0
    r = await client.post(f"/api/v3/{args.model}", json=request_body(args, index, sync))
    if r.status_code != 200:
        return JobTiming(concurrency, index, "", f"http {r.status_code}", _ms(started), None, 0.0, 0, r.text[:200])
    data = r.json()["data"]
    while data["status"] not in ("completed", "failed"):
        if data["status"] == "processing" and queue_ms is None:
            queue_ms = _ms(started)
        await asyncio.sleep(args.poll_interval)
        polls += 1
        r = await client.get(f"/api/v3/predictions/{data['id']}/result")
        r.raise_for_status()
        data = r.json()["data"]
    e2e = _ms(started)
    inference = float(data.get("timings", {}).get("inference", 0))
    if queue_ms is None:  # never seen processing (sync mode, or a fast job between polls)
        queue_ms = max(0.0, e2e - inference) if sync else None
    return JobTiming(
        concurrency, index, data["id"], data["status"], e2e, queue_ms, inference, polls, data.get("error", "")
    )


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


async def run_level(args: argparse.Namespace, concurrency: int, bar: tqdm) -> tuple[list[JobTiming], float]:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    timeout = httpx.Timeout(args.timeout)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=timeout, limits=limits) as client:

        async def one(i: int) -> JobTiming:
            async with sem:
                try:
                    timing = await run_job(client, args, concurrency, i)
                except httpx.HTTPError as exc:
                    timing = JobTiming(concurrency, i, "", "error", 0.0, None, 0.0, 0, f"{type(exc).__name__}: {exc}")
                bar.update(1)
                return timing

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(args.jobs)))
        return list(results), time.perf_counter() - started


def summarize(results: list[JobTiming], wall_s: float, concurrency: int) -> dict[str, Any]:
    ok = [r for r in results if r.status == "completed"]
    queue = [r.queue_ms for r in ok if r.queue_ms is not None]
    return {
        "concurrency": concurrency,
        "jobs": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "wall_s": wall_s,
        "throughput_jobs_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "e2e_ms": percentiles([r.e2e_ms for r in ok]),
        "inference_ms": percentiles([r.inference_ms for r in ok]),
        "queue_ms": percentiles(queue),
    }


def plot(path: Path, results: list[JobTiming], summaries: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len(summaries) > 1
    fig, axes = plt.subplots(1, 2 if several else 1, figsize=(12 if several else 6, 4), squeeze=False)
    ax = axes[0][0]
    for s in summaries:
        values = [r.e2e_ms for r in results if r.concurrency == s["concurrency"] and r.status == "completed"]
        ax.hist(values, bins=min(30, max(5, len(values))), alpha=0.6, label=f"C={s['concurrency']}")
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("jobs")
    ax.set_title(f"{title}: latency distribution")
    ax.legend()
    if several:
        ax = axes[0][1]
        cs = [s["concurrency"] for s in summaries]
        for key in ("p50", "p90", "p99"):
            ax.plot(cs, [s["e2e_ms"][key] for s in summaries], marker="o", label=key)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("end-to-end latency (ms)")
        ax.set_title("latency vs concurrency")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-edit bench", description="Latency benchmark for a v3 endpoint.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL (hosted: https://api.wavespeed.ai)")
    p.add_argument("--key", default=os.environ.get("WAVESPEED_API_KEY"), help="API key (env WAVESPEED_API_KEY)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model path after /api/v3/")
    p.add_argument("-n", "--jobs", type=int, default=20, help="jobs per concurrency level")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1], help="one or more levels")
    p.add_argument("--mode", choices=["async", "sync"], default="async")
    p.add_argument("--prompt", default="make the red square blue")
    p.add_argument("--image", help="image URL or data URI (default: a generated 64x64 PNG)")
    p.add_argument("--size", help="output size WxH, e.g. 256*256")
    p.add_argument("--steps", type=int, help="num_inference_steps (servers that allow overrides)")
    p.add_argument("--poll-interval", type=float, default=0.05, help="seconds between result polls")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default="bench-out", help="folder for client.json / .csv / .png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    all_results: list[JobTiming] = []
    summaries = []
    with tqdm(total=args.jobs * len(args.concurrency), desc="jobs", disable=args.quiet, file=sys.stderr) as bar:
        for c in args.concurrency:
            results, wall = asyncio.run(run_level(args, c, bar))
            all_results += results
            summaries.append(summarize(results, wall, c))
    rows = [
        [
            args.mode,
            s["concurrency"],
            s["completed"],
            s["failed"],
            s["e2e_ms"]["p50"],
            s["e2e_ms"]["p90"],
            s["e2e_ms"]["p99"],
            s["queue_ms"]["p50"],
            s["inference_ms"]["p50"],
            s["throughput_jobs_s"],
        ]
        for s in summaries
    ]
    columns = [
        "mode",
        "C",
        "ok",
        "failed",
        "e2e p50 ms",
        "e2e p90 ms",
        "e2e p99 ms",
        "queue p50 ms",
        "inference p50 ms",
        "jobs/s",
    ]
    markdown = print_table(f"{args.url} {args.model}", columns, rows)
    out = Path(args.out)
    report = {
        "url": args.url,
        "model": args.model,
        "mode": args.mode,
        "summaries": summaries,
        "table": markdown,
        "jobs": [asdict(r) for r in all_results],
    }
    write_json(out / "client.json", report)
    write_csv(out / "client.csv", [asdict(r) for r in all_results])
    plot(out / "client.png", all_results, summaries, args.mode)
    return report


def main(argv: list[str] | None = None) -> int:
    report = run(build_parser().parse_args(argv))
    return 0 if all(s["failed"] == 0 for s in report["summaries"]) else 1


if __name__ == "__main__":
    sys.exit(main())
