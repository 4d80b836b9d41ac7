"""Does one big body stall everyone else? Result-poll latency of N polling clients, alone and while
one client submits a big inline image (a PNG of noise as a data URI) again and again.

An API-only server (no worker: the polled job stays queued, nothing else loads the machine) is
started; ``--pollers`` clients poll ``GET /api/v3/predictions/{id}/result`` back to back for
``--seconds``, first alone, then beside the big submitter (its own thread and connection, so that
building and sending the body does not slow the pollers' client loop). The table gives p50/p99 of
the polls in each phase and their ratio: the goal (issue 17) is a p99 ratio under 2.

    python -m benchmarks.contention                       # 8 pollers, a ~38 MB body
    python -m benchmarks.contention --quick --out bench-out   # CI: small body, short phases
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.overhead import free_port, start_server, stop_server
from benchmarks.report import percentiles, print_table, write_json

MODEL_PATH = "/api/v3/wavespeed-ai/qwen-image/edit"
GOAL_P99_RATIO = 2.0


def big_png(megabytes: float) -> bytes:
    """A PNG of noise (incompressible: the file is as big as its pixels), about ``megabytes`` MB."""
    from PIL import Image

    side = max(16, int((megabytes * 1e6 / 3) ** 0.5))
    img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def big_body(megabytes: float) -> bytes:
    """A submit body of about ``megabytes`` MB on the wire (the PNG is 3/4 of it, base64)."""
    png = big_png(megabytes * 0.75)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return json.dumps({"prompt": "make it blue", "image": uri, "size": "256*256"}).encode()


async def poll_for(url: str, prediction_id: str, pollers: int, seconds: float) -> list[float]:
    """``pollers`` clients polling one result back to back for ``seconds``: each poll's latency (ms)."""
    latencies: list[float] = []
    path = f"/api/v3/predictions/{prediction_id}/result"
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=pollers)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(http.get(path) for _ in range(pollers)))  # connections open, paths warm

        async def loop() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                r = await http.get(path)
                latencies.append((time.perf_counter() - started) * 1000)
                r.raise_for_status()

        await asyncio.gather(*(loop() for _ in range(pollers)))
    return latencies


class BigSubmitter(threading.Thread):
    """Submits ``body`` back to back on its own connection until stopped; records each submit's ms."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.stop = threading.Event()
        self.started_one = threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                self.started_one.set()
                started = time.perf_counter()
                r = http.post(MODEL_PATH, content=self.body, headers=headers)
                self.latencies.append((time.perf_counter() - started) * 1000)
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code} {r.text[:200]}")
                    return


def measure(url: str, body: bytes, pollers: int, seconds: float) -> dict[str, Any]:
    small = {"prompt": "x", "image": "data:image/png;base64," + base64.b64encode(big_png(0.001)).decode()}
    r = httpx.post(url + MODEL_PATH, json=small, timeout=60)
    r.raise_for_status()
    prediction_id = r.json()["data"]["id"]
    # Warm the submit path with the big body once (first-use costs: imports, pools).
    httpx.post(url + MODEL_PATH, content=body, headers={"content-type": "application/json"}, timeout=120)
    alone = asyncio.run(poll_for(url, prediction_id, pollers, seconds))
    submitter = BigSubmitter(url, body)
    submitter.start()
    submitter.started_one.wait()
    beside = asyncio.run(poll_for(url, prediction_id, pollers, seconds))
    submitter.stop.set()
    submitter.join()
    if submitter.errors:
        raise RuntimeError(f"big submit failed: {submitter.errors[0]}")
    return {"alone": alone, "beside": beside, "submits": submitter.latencies}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.contention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="CI: a 2 MB body, 4 pollers, 1.5 s phases")
    p.add_argument("--pollers", type=int, help="polling clients (default 8)")
    p.add_argument("--body-mb", type=float, help="size of the big submit body in MB (default 38: under the 40 MiB cap)")
    p.add_argument("--seconds", type=float, help="length of each phase (default 10)")
    p.add_argument("--env", action="append", default=[], help="extra server setting, NAME=VALUE (repeatable)")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    pollers = args.pollers or (4 if args.quick else 8)
    body_mb = args.body_mb or (2.0 if args.quick else 38.0)
    seconds = args.seconds or (1.5 if args.quick else 10.0)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    body = big_body(body_mb)
    extra = {
        "QWEN_EDIT_EMBEDDED_WORKERS": "0",  # API only: the polled job stays queued, no pipeline loads the CPU
        "QWEN_EDIT_MAX_IMAGE_BYTES": str(len(body)),
        "QWEN_EDIT_MAX_IMAGE_PIXELS": "100000000",
        **dict(kv.split("=", 1) for kv in args.env),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(out / "contention-data", Path("unused"), port, 2, extra, ready_path="/livez")
    try:
        runs = measure(url, body, pollers, seconds)
    finally:
        stop_server(proc)
    alone, beside = percentiles(runs["alone"]), percentiles(runs["beside"])
    submits = percentiles(runs["submits"])
    ratio = beside["p99"] / alone["p99"]
    rows = [
        ["polls alone", len(runs["alone"]), alone["p50"], alone["p99"], 1.0],
        ["polls beside the big submits", len(runs["beside"]), beside["p50"], beside["p99"], ratio],
        [f"big submits ({len(body) / 1e6:.1f} MB)", len(runs["submits"]), submits["p50"], submits["p99"], None],
    ]
    table = print_table(
        f"Result polls, {pollers} clients, {seconds:g} s a phase, alone and beside back-to-back big submits",
        ["requests", "count", "p50 ms", "p99 ms", "p99 ratio"],
        rows,
    )
    print(f"p99 ratio {ratio:.2f} (goal < {GOAL_P99_RATIO:g}): {'met' if ratio < GOAL_P99_RATIO else 'missed'}")
    write_json(
        out / "contention.json",
        {
            "pollers": pollers,
            "seconds": seconds,
            "body_bytes": len(body),
            "alone": alone,
            "beside": beside,
            "submits": submits,
            "p99_ratio": ratio,
            "goal_p99_ratio": GOAL_P99_RATIO,
            "table": table,
        },
    )
    (out / "contention.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
