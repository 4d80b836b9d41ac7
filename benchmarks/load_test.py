"""A bounded load test on loopback: submit past the queue cap, poll results while workers are busy.

    python -m benchmarks.load_test --url http://127.0.0.1:8000 --key KEY --seconds 30 --submitters 8

Reports accepted / 429 counts and p50/p99 of result polls, and checks that every accepted
prediction is still known to the server (none lost). Exit code 1 when one is missing.

A load test submits far more jobs than a server can run in its few seconds (hundreds; each is a
real edit, hours of GPU time at 50 steps): when it ends, it cancels every job of its own that has
not finished, and says how many. ``--keep-jobs`` leaves them to run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import time
from dataclasses import dataclass, field

import httpx
from PIL import Image

MODEL = "wavespeed-ai/qwen-image/edit"


@dataclass
class Tally:
    accepted: list[str] = field(default_factory=list)
    limited: int = 0
    retry_after_missing: int = 0
    other: dict[int, int] = field(default_factory=dict)
    poll_ms: list[float] = field(default_factory=list)
    cancelled: int = 0  # unfinished jobs of this test cancelled at its end


def _image() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _submitter(client: httpx.AsyncClient, tally: Tally, stop_at: float, body: dict[str, object]) -> None:
    while time.monotonic() < stop_at:
        r = await client.post(f"/api/v3/{MODEL}", json=body)
        if r.status_code == 200:
            tally.accepted.append(r.json()["data"]["id"])
        elif r.status_code == 429:
            tally.limited += 1
            tally.retry_after_missing += "retry-after" not in r.headers
            await asyncio.sleep(0.05)
        else:
            tally.other[r.status_code] = tally.other.get(r.status_code, 0) + 1


async def _poller(client: httpx.AsyncClient, tally: Tally, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        if not tally.accepted:
            await asyncio.sleep(0.05)
            continue
        pid = tally.accepted[len(tally.poll_ms) % len(tally.accepted)]
        started = time.perf_counter()
        r = await client.get(f"/api/v3/predictions/{pid}/result")
        tally.poll_ms.append((time.perf_counter() - started) * 1000)
        r.raise_for_status()


async def run(
    url: str,
    key: str,
    seconds: float,
    submitters: int,
    pollers: int,
    *,
    size: str = "256*256",
    steps: int | None = None,
    keep_jobs: bool = False,
) -> tuple[Tally, list[str]]:
    tally = Tally()
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=submitters + pollers + 4)
    body: dict[str, object] = {"prompt": "load", "image": _image(), "size": size}
    if steps is not None:
        body["num_inference_steps"] = steps
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(
            *(_submitter(client, tally, stop_at, body) for _ in range(submitters)),
            *(_poller(client, tally, stop_at) for _ in range(pollers)),
        )
        missing, unfinished = [], []
        for pid in tally.accepted:  # nothing accepted may be lost
            r = await client.get(f"/api/v3/predictions/{pid}/result")
            status = r.json()["data"]["status"] if r.status_code == 200 else None
            if status not in ("created", "processing", "completed"):
                missing.append(pid)
            elif status != "completed":
                unfinished.append(pid)
        if not keep_jobs:
            tally.cancelled = await _cancel(client, unfinished)
    return tally, missing


async def _cancel(client: httpx.AsyncClient, ids: list[str]) -> int:
    """Cancel this test's unfinished jobs (a queued one fails at once, a running one at its next step)."""
    gate = asyncio.Semaphore(8)

    async def one(pid: str) -> bool:
        async with gate:
            r = await client.post(f"/api/v3/predictions/{pid}/cancel")
            return r.status_code == 200

    return sum(await asyncio.gather(*(one(pid) for pid in ids)))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(tally: Tally, missing: list[str]) -> str:
    return (
        f"accepted={len(tally.accepted)} limited_429={tally.limited} other={tally.other} "
        f"lost={len(missing)} polls={len(tally.poll_ms)} "
        f"poll_p50_ms={statistics.median(tally.poll_ms) if tally.poll_ms else 0:.1f} "
        f"poll_p99_ms={percentile(tally.poll_ms, 0.99):.1f} cancelled_unfinished={tally.cancelled}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load_test", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--submitters", type=int, default=8)
    parser.add_argument("--pollers", type=int, default=4)
    parser.add_argument("--size", default="256*256", help="output size W*H of every job (default 256*256)")
    parser.add_argument("--steps", type=int, help="num_inference_steps of every job (servers that allow overrides)")
    parser.add_argument(
        "--keep-jobs", action="store_true", help="leave the jobs still queued or running at the end (default: cancel)"
    )
    args = parser.parse_args(argv)
    seconds = min(args.seconds, 60.0)  # bounded by design
    tally, missing = asyncio.run(
        run(
            args.url,
            args.key,
            seconds,
            args.submitters,
            args.pollers,
            size=args.size,
            steps=args.steps,
            keep_jobs=args.keep_jobs,
        )
    )
    print(report(tally, missing))
    if tally.cancelled:
        print(f"cancelled {tally.cancelled} unfinished jobs of this test (--keep-jobs keeps them)")
    elif args.keep_jobs:
        print("--keep-jobs: the jobs still queued or running were left on the server")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
