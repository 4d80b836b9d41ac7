"""A bounded load test on loopback: submit past the queue cap, poll results while workers are busy.

    python -m benchmarks.load_test --url http://127.0.0.1:8000 --key KEY --seconds 30 --submitters 8

Reports accepted / 429 counts and p50/p99 of result polls, and checks that every accepted
prediction is still known to the server (none lost). Exit code 1 when one is missing.
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


def _image() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _submitter(client: httpx.AsyncClient, tally: Tally, stop_at: float, image: str) -> None:
    while time.monotonic() < stop_at:
        r = await client.post(f"/api/v3/{MODEL}", json={"prompt": "load", "image": image, "size": "256*256"})
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


async def run(url: str, key: str, seconds: float, submitters: int, pollers: int) -> tuple[Tally, list[str]]:
    tally = Tally()
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=submitters + pollers + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        stop_at = time.monotonic() + seconds
        image = _image()
        await asyncio.gather(
            *(_submitter(client, tally, stop_at, image) for _ in range(submitters)),
            *(_poller(client, tally, stop_at) for _ in range(pollers)),
        )
        missing = []
        for pid in tally.accepted:  # nothing accepted may be lost
            r = await client.get(f"/api/v3/predictions/{pid}/result")
            if r.status_code != 200 or r.json()["data"]["status"] not in ("created", "processing", "completed"):
                missing.append(pid)
    return tally, missing


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
        f"poll_p99_ms={percentile(tally.poll_ms, 0.99):.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--submitters", type=int, default=8)
    parser.add_argument("--pollers", type=int, default=4)
    args = parser.parse_args()
    seconds = min(args.seconds, 60.0)  # bounded by design
    tally, missing = asyncio.run(run(args.url, args.key, seconds, args.submitters, args.pollers))
    print(report(tally, missing))
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
