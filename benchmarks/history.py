"""History and usage reads at scale, in one run: ``--jobs`` stored predictions (default a million,
spread over ``--keys`` API keys and 60 days) in a fresh SQLite store, then the store's own queries
(server/jobs/history.py), first with the migration-0004 indexes, then with those two indexes
dropped (the schema before 0004), side by side as ratios.

    python -m benchmarks.history --out bench-out                 # a million jobs
    python -m benchmarks.history --jobs 20000 --out bench-out    # quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

from benchmarks.report import print_table, write_json
from server.jobs.contract import Status
from server.jobs.history import DAY_MS, HistoryQuery, Scope
from server.jobs.models import jobs
from server.jobs.store import JobStore

INDEXES = {
    "ix_jobs_key_created": "CREATE INDEX ix_jobs_key_created ON jobs (api_key_id, created_at, id)",
    "ix_jobs_created": "CREATE INDEX ix_jobs_created ON jobs (created_at, id)",
}
NOW = 1_800_000_000_000  # a fixed "now" (2027): the same rows every run


def fill(store: JobStore, count: int, keys: int, batch: int = 20_000) -> None:
    """``count`` finished jobs, a key each in turn, created over the 60 days before NOW."""
    params = {"prompt": "x", "images": [], "seed": 1, "num_inference_steps": 2, "true_cfg_scale": 1.0}
    step = 60 * DAY_MS // max(1, count)
    for start in range(0, count, batch):
        rows = []
        for i in range(start, min(count, start + batch)):
            created = NOW - 60 * DAY_MS + i * step
            rows.append(
                {
                    "id": f"{i:032x}",
                    "model": "wavespeed-ai/qwen-image/edit",
                    "variant": "edit",
                    "status": "completed" if i % 10 else "failed",
                    "priority": 0,
                    "input": {"prompt": "x"},
                    "params": params,
                    "base_url": "http://127.0.0.1:8000",
                    "outputs": [f"outputs/{i:032x}/0.jpeg"],
                    "output_format": "jpeg",
                    "base64_output": False,
                    "seed": 1,
                    "error": "",
                    "attempts": 1,
                    "max_attempts": 3,
                    "cancel_requested": False,
                    "progress_step": 2,
                    "progress_total": 2,
                    "inference_ms": 1000 + i % 500,
                    "api_key_id": f"key{i % keys:013d}",
                    "created_at": created,
                    "finished_at": created + 2000,
                    "updated_at": created + 2000,
                }
            )
        with store.db.write() as conn:
            conn.execute(insert(jobs), rows)


def timed(call: Callable[[], Any], repeat: int) -> float:
    """Median milliseconds of ``repeat`` calls (after one warm-up)."""
    call()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs)


def queries(store: JobStore) -> dict[str, Callable[[], Any]]:
    key = Scope("key0000000000000")
    everyone = Scope(None, all_keys=True)
    day = NOW - DAY_MS
    return {
        "history page 1 (one key)": lambda: store.history.page(key, HistoryQuery(page_size=20)),
        "history page 50 (one key)": lambda: store.history.page(key, HistoryQuery(page=50, page_size=20)),
        "history, last 24 h, completed (one key)": lambda: store.history.page(
            key, HistoryQuery(created_after=day, statuses=(Status.COMPLETED,))
        ),
        "history page 1 (admin: every key)": lambda: store.history.page(everyone, HistoryQuery(page_size=20)),
        "usage, last 7 days (one key)": lambda: store.history.usage(key, NOW - 7 * DAY_MS, NOW),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    db = args.out / "history.db"
    db.unlink(missing_ok=True)
    store = JobStore.at(f"sqlite:///{db.resolve()}")
    store.migrate()
    started = time.perf_counter()
    fill(store, args.jobs, args.keys)
    print(f"stored {args.jobs:,} jobs in {time.perf_counter() - started:.0f} s")
    try:
        with_index = {name: timed(call, args.repeat) for name, call in queries(store).items()}
        with store.db.write() as conn:
            for name in INDEXES:
                conn.execute(text(f"DROP INDEX {name}"))
        without = {name: timed(call, args.repeat) for name, call in queries(store).items()}
        with store.db.write() as conn:  # leave the file as the migrations made it
            for ddl in INDEXES.values():
                conn.execute(text(ddl))
    finally:
        store.close()
    rows = [[name, with_index[name], without[name], without[name] / max(with_index[name], 1e-6)] for name in with_index]
    markdown = print_table(
        f"History reads, {args.jobs:,} jobs over {args.keys} keys (median ms of {args.repeat})",
        ["query", "0004 indexes ms", "without them ms", "ratio"],
        rows,
    )
    summary = {"jobs": args.jobs, "keys": args.keys, "with": with_index, "without": without}
    write_json(args.out / "history.json", summary)
    (args.out / "history.md").write_text(markdown + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
