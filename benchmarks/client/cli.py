"""``qwen-edit bench`` (and ``python -m benchmarks.client``): options, checks, and the run itself.

    qwen-edit bench --url http://127.0.0.1:8000 --request-rate 0.5 1 2 --goodput e2el:5000 --num-warmups 2
    qwen-edit bench --url off=http://127.0.0.1:8001 on=http://127.0.0.1:8002 -c 4 -n 40
    qwen-edit bench compare bench-out/a.json bench-out/b.json

Bad input, an unreachable endpoint or a refused key end with one line on stderr and exit 2; a run
with failed requests exits 1; Ctrl-C stops sending, cancels this run's unfinished jobs on the
server, writes what finished (marked interrupted) and exits 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shlex
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import httpx
from tqdm import tqdm

from benchmarks.client import compare, report
from benchmarks.client.backends import BACKENDS, Fatal, Options, backend
from benchmarks.client.inputs import builtin, load_dataset, sequence
from benchmarks.client.metrics import Goodput, Record, capacity, summarize
from benchmarks.client.runner import Endpoint, Runner
from benchmarks.client.schedule import Load, loads

PROG = "qwen-edit bench"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(2, f"{PROG}: error: {message} (see {PROG} -h)\n")


def rate(value: str) -> float:
    r = float(value)
    if not r > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf, got {value}")
    return r


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG, description="Latency benchmark of v3 / OpenAI image-edit endpoints (`compare RUN...`: compare runs)."
    )
    p.add_argument(
        "--url",
        nargs="+",
        default=["http://127.0.0.1:8000"],
        help="endpoints, each URL or LABEL=URL (hosted: https://api.wavespeed.ai)",
    )
    p.add_argument(
        "--backend",
        nargs="+",
        choices=BACKENDS,
        default=["v3"],
        help="v3 (async + polling), v3-sync, openai (/v1/images/edits): one, or one per --url",
    )
    p.add_argument(
        "--key",
        nargs="+",
        default=[os.environ.get("WAVESPEED_API_KEY") or ""],
        help="API key: one, or one per --url (env WAVESPEED_API_KEY)",
    )
    p.add_argument(
        "--model",
        default="wavespeed-ai/qwen-image/edit",
        help="model path after /api/v3/ (the openai backend sends it as `model`)",
    )
    p.add_argument("-n", "--num-prompts", type=int, default=20, help="measured requests per endpoint and load value")
    p.add_argument(
        "-c",
        "--max-concurrency",
        type=int,
        nargs="+",
        help="closed loop: requests in flight (several: a sweep); with --request-rate: a cap",
    )
    p.add_argument(
        "--request-rate",
        type=rate,
        nargs="+",
        help="open loop: requests per second (inf: all at once; several: a sweep)",
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrivals: 1 Poisson, <1 burstier, >1 more even",
    )
    p.add_argument("--num-warmups", type=int, default=1, help="requests per endpoint sent first and not measured")
    p.add_argument("--seed", type=int, default=0, help="arrivals, input order and job seeds")
    p.add_argument(
        "--dataset",
        type=Path,
        help='JSONL of {"prompt", "image" (URL, data URI or file), "size"?}; default: the built-in set',
    )
    p.add_argument("--size", help="output size W*H for every request, e.g. 256*256 (default: the input's)")
    p.add_argument("--steps", type=int, help="num_inference_steps (servers that allow overrides)")
    p.add_argument(
        "--no-download", action="store_true", help="stop the clock at `completed`, without fetching the output"
    )
    p.add_argument(
        "--goodput", nargs="+", metavar="METRIC:MS", help="limits a good request meets, e.g. e2el:30000 queue:5000"
    )
    p.add_argument(
        "--metric-percentiles", default="50,90,99", help="comma-separated percentiles in the results (default 50,90,99)"
    )
    p.add_argument("--poll-interval", type=float, default=0.25, help="seconds between polls while a job's end is far")
    p.add_argument("--fast-poll-interval", type=float, default=0.015, help="seconds between polls near a job's end")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a request counts as failed (timeout)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for NAME.json / .csv / .md / .png")
    p.add_argument("--name", default="bench", help="the run's name (file names and titles)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def endpoints_of(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(label, url, backend, key) per --url."""
    urls = args.url
    for opt in ("backend", "key"):
        values = getattr(args, opt)
        if len(values) not in (1, len(urls)):
            raise ValueError(f"--{opt} takes one value or one per --url ({len(urls)})")
    out = []
    for i, spec in enumerate(urls):
        label, _, url = spec.rpartition("=") if "=" in spec.split("://")[0] else ("", "", spec)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--url {spec!r}: give http(s)://HOST[:PORT] or LABEL=URL")
        backend_name = args.backend[i if len(args.backend) > 1 else 0]
        out.append(
            (label or url.split("://")[1].rstrip("/"), url, backend_name, args.key[i if len(args.key) > 1 else 0])
        )
    if len({e[0] for e in out}) != len(out):
        raise ValueError("--url: give each endpoint its own label (LABEL=URL)")
    return out


def check(args: argparse.Namespace) -> tuple[list[Load], Goodput, list[float]]:
    if args.num_prompts < 1 or args.num_warmups < 0:
        raise ValueError("-n must be >= 1 and --num-warmups >= 0")
    if args.burstiness <= 0:
        raise ValueError("--burstiness must be > 0")
    if any(c < 1 for c in args.max_concurrency or []):
        raise ValueError("--max-concurrency must be >= 1")
    try:
        pcts = [float(p) for p in args.metric_percentiles.split(",")]
    except ValueError:
        raise ValueError(f"--metric-percentiles {args.metric_percentiles!r}: give numbers like 50,90,99") from None
    if not all(0 < p <= 100 for p in pcts):
        raise ValueError("--metric-percentiles: each must be in (0, 100]")
    return loads(args.request_rate, args.max_concurrency, args.burstiness), Goodput.parse(args.goodput), pcts


async def bench(args: argparse.Namespace, sweep: list[Load], goodput: Goodput, pcts: list[float]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    inputs = load_dataset(args.dataset) if args.dataset else builtin()
    opts = Options(args.model, args.steps, args.size, not args.no_download, args.poll_interval, args.fast_poll_interval)
    async with contextlib.AsyncExitStack() as stack:
        endpoints = []
        for label, url, name, key in endpoints_of(args):
            client = httpx.AsyncClient(
                base_url=url,
                headers={"Authorization": f"Bearer {key}"} if key else {},
                timeout=httpx.Timeout(args.timeout),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            )
            endpoints.append(Endpoint(label, url, backend(name, opts), await stack.enter_async_context(client)))
        for ep in endpoints:
            await ep.backend.preflight(ep.client)
        servers = {ep.label: await ep.backend.describe(ep.client) for ep in endpoints}
        total = (args.num_warmups + args.num_prompts * len(sweep)) * len(endpoints)
        bar = tqdm(total=total, desc="requests", disable=args.quiet, file=sys.stderr)
        runner = Runner(endpoints, sequence(inputs, args.num_prompts, args.seed), args.seed, args.timeout, stop)
        runner.on_done = lambda _r: bar.update(1)
        started = time.time()
        await runner.warmup(args.num_warmups)
        results: list[dict[str, Any]] = []
        records: list[Record] = []
        for load in sweep:
            if stop.is_set():
                break
            per = await runner.run(load, args.num_prompts)
            for ep in endpoints:
                mine, duration = per[ep.label]
                records += mine
                summary = summarize(mine, duration, load, pcts, goodput)
                e2els = [r.e2el_ms for r in mine if r.ok and r.e2el_ms is not None]
                results.append(
                    {"label": ep.label, "url": ep.url, "backend": ep.backend.name, **summary, "e2els_ms": e2els}
                )
        bar.close()
        # Jobs still open: Ctrl-C, or requests given up on (timeout). Either way not ours to leave running.
        cancelled = await runner.cancel_unfinished()
    if stop.is_set():
        print(
            f"interrupted: cancelled {cancelled} unfinished job(s) on the server; writing what finished",
            file=sys.stderr,
        )
    run = {
        "name": args.name,
        "date": dt.datetime.fromtimestamp(started).strftime("%Y%m%d-%H%M%S"),
        "command": f"{PROG} {shlex.join(args.argv)}",
        "client_version": metadata.version("qwen-edit-server"),
        "backend": ",".join(dict.fromkeys(ep.backend.name for ep in endpoints)),
        "model_id": args.model,
        "interrupted": stop.is_set(),
        "num_warmups": args.num_warmups,
        "seed": args.seed,
        "percentiles": pcts,
        "goodput": goodput.limits,
        "download": not args.no_download,
        "resolution": {
            "poll_interval_ms": args.poll_interval * 1000,
            "fast_poll_interval_ms": args.fast_poll_interval * 1000,
            "max_resolution_ms": max(
                (r.resolution_ms for r in records if r.ok and r.resolution_ms is not None), default=None
            ),
            "note": "each request's end is seen within its resolution_ms (the gap before the poll that saw it)",
        },
        "endpoints": [
            {"label": ep.label, "url": ep.url, "backend": ep.backend.name, "server": servers[ep.label]}
            for ep in endpoints
        ],
        "inputs": str(args.dataset) if args.dataset else "built-in",
        "size": args.size,
        "steps": args.steps,
        "results": results,
        "capacity": {ep.label: capacity([r for r in results if r["label"] == ep.label], goodput) for ep in endpoints},
    }
    report.write_numbers(run, records, args.out, args.name)
    markdown = report.table(run)
    (args.out / f"{args.name}.md").write_text(markdown + "\n")
    report.try_plot(run, args.out, args.name)
    if stop.is_set():
        return 130
    return 1 if any(not r.ok for r in records) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        sweep, goodput, pcts = check(args)
        endpoints_of(args)
        return asyncio.run(bench(args, sweep, goodput, pcts))
    except (ValueError, Fatal, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
