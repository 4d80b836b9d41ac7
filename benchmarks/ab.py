"""Paired A/B of the sync path: what a change does to the time the server adds to a job.

Two servers run side by side, one from each source tree (a git revision, checked out into a
temporary worktree, or a folder), each with its own data folder and, with ``--postgres``, its own
fresh database. Sync jobs go to them alternately, the order of each pair drawn at random, so that
the machine's drift falls on both alike; each job's added time is its end-to-end time minus its own
pipeline call (as in benchmarks/overhead.py), and the pairs' differences are the finding.

Two servers on one machine are not quite alike (which started first, its ports, its database): on
the 2-core machine the server started second measured about 0.7 ms faster, whatever it ran. So
``--rounds 2`` (the default) runs a second round with the trees' places swapped, and the estimate is
the mean of the two rounds' differences: that bias cancels.

    python -m benchmarks.ab --a HEAD~1 --b HEAD --jobs 100 --out bench-out
    python -m benchmarks.ab --a HEAD~1 --b HEAD --postgres postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.client.backends import Jobs, Options, SyncBackend
from benchmarks.client.inputs import Input, data_uri, square_image
from benchmarks.client.metrics import Record
from benchmarks.overhead import PROMPT, ROOT, ensure_model, free_port, start_server, stop_server
from benchmarks.report import print_table, write_json
from benchmarks.scale import database

WARM_UP = 3  # jobs a server runs first, not counted (its first calls warm its caches)


@contextlib.contextmanager
def source_tree(spec: str) -> Iterator[Path]:
    """``spec`` as a folder to run a server from: a folder as it is, else a git revision of this
    repository checked out into a temporary worktree (removed afterwards)."""
    if Path(spec).is_dir():
        yield Path(spec).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="qwen-ab-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), spec], cwd=ROOT, check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


async def alternate(urls: dict[str, str], jobs: int, size: int) -> dict[str, list[float]]:
    """``jobs`` sync jobs to each server (after ``WARM_UP`` each), in pairs of random order; each
    job's added ms (end to end minus its pipeline call), by side."""
    backend = SyncBackend(Options(size=f"{size}*{size}", download=False))
    inp = Input("square", PROMPT, data_uri(square_image(), "image/png"), None)
    added: dict[str, list[float]] = {side: [] for side in urls}
    clients = {side: httpx.AsyncClient(base_url=url, timeout=600) for side, url in urls.items()}
    try:
        for i in range(jobs + WARM_UP):
            for side in random.sample(list(urls), len(urls)):
                rec = Record("sync", "C=1", i, inp.name)
                await backend.send(clients[side], inp, i, rec, Jobs())
                if not rec.ok or rec.e2el_ms is None or rec.inference_ms is None:
                    raise RuntimeError(f"side {side}, job {i}: {rec.code} {rec.error}")
                if i >= WARM_UP:
                    added[side].append(rec.e2el_ms - rec.inference_ms)
    finally:
        for client in clients.values():
            await client.aclose()
    return added


def one_round(trees: dict[str, Path], model: Path, out: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """Both servers up (in ``trees``' order: the first starts first), the jobs, both stopped."""
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        for side, tree in trees.items():
            data = Path(tempfile.mkdtemp(prefix=f"ab-{side}-", dir=out))
            backend = "postgresql" if args.postgres else "sqlite"
            env = {"QWEN_EDIT_DATABASE_URL": stack.enter_context(database(backend, args.postgres, data))}
            port = free_port()
            proc = start_server(data, model, port, args.steps, env, tree=tree)
            stack.callback(stop_server, proc)
            urls[side] = f"http://127.0.0.1:{port}"
        return asyncio.run(alternate(urls, args.jobs, args.size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--a", required=True, help="the baseline: a git revision or a folder")
    p.add_argument("--b", required=True, help="the change: a git revision or a folder")
    p.add_argument("--jobs", type=int, default=100, help="sync jobs a server, a round")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the even ones with the servers' places swapped")
    p.add_argument("--postgres", help="a PostgreSQL URL to create each server's fresh database with")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--model", help="model folder (default: a tiny model built under --out)")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(out, args.model)
    rows: list[list[object]] = []
    diffs: list[float] = []
    with source_tree(args.a) as tree_a, source_tree(args.b) as tree_b:
        for n in range(args.rounds):
            trees = {"a": tree_a, "b": tree_b} if n % 2 == 0 else {"b": tree_b, "a": tree_a}
            added = one_round(trees, model, out, args)
            paired = [b - a for a, b in zip(added["a"], added["b"], strict=True)]
            diffs.append(statistics.median(paired))
            rows.append(
                [
                    f"{n + 1} ({' first, '.join(trees)} second)",
                    round(statistics.median(added["a"]), 2),
                    round(statistics.median(added["b"]), 2),
                    round(statistics.median(paired), 2),
                    round(statistics.mean(paired), 2),
                ]
            )
    estimate = statistics.mean(diffs)
    rows.append(["estimate (mean of the rounds)", "", "", round(estimate, 2), ""])
    print_table(
        f"Sync path, ms added by the server: A = {args.a}, B = {args.b}, {args.jobs} jobs a server a round",
        ["round", "A p50", "B p50", "B - A paired median", "B - A paired mean"],
        rows,
    )
    write_json(out / "ab.json", {"a": args.a, "b": args.b, "rounds": rows, "estimate_ms": estimate})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
