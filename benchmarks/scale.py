"""What each per-request and per-interval cost does as the store grows (issue 17): jobs stored
(1k → 1M finished jobs, 100 queued) and jobs queued (100 → 100k, 1k stored), on SQLite and
PostgreSQL, with each cost's growth ratio (last step / first). Flat means a ratio near 1.

The store is seeded in bulk by the database itself (``server/jobs/seed.py``), then each cost is
timed in this process, median of ``--reps`` calls (ms):

* ``metrics``: a full ``/metrics`` collection of the job store (what every API replica serves);
* ``claim``: a worker's claim of the next job (handed back after each, so the queue stays put);
* ``per_key``: one API key's in-flight count (``QWEN_EDIT_MAX_JOBS_PER_KEY``);
* ``submit``: storing a job with the queue cap and the per-key cap on;
* ``retention``: one retention pass with nothing due (jobs and files);
* ``startup``: opening the store, migrating (nothing to do), registering the metrics collector and
  reading the queue depth, as an API process does at start-up.

Then, with ``--notify``: store-level submit throughput with 0 vs 4 idle worker processes waiting on
the ``jobs`` channel (each woken worker claims, as a real one does), on each notifier.

    python -m benchmarks.scale --out bench-out                                  # SQLite, 1k → 1M
    python -m benchmarks.scale --postgres postgresql://postgres@127.0.0.1:5432/postgres --out bench-out
    python -m benchmarks.scale --quick --out bench-out                          # CI: tiny steps
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.report import print_table, write_json

STORED = (1_000, 10_000, 100_000, 1_000_000)
QUEUED = (100, 10_000, 100_000)
COSTS = ("metrics", "claim", "per_key", "submit", "retention", "startup")
RETENTION_S = 30 * 86_400.0  # nothing seeded is this old: a pass with nothing due


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median milliseconds of ``reps`` calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@contextlib.contextmanager
def database(backend: str, admin: str | None, folder: Path) -> Iterator[str]:
    """A fresh, empty database URL; PostgreSQL ones are created beside ``admin``'s and dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / f'scale-{secrets.token_hex(4)}.db'}"
        return
    import psycopg

    assert admin is not None
    name = f"qe_scale_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def template_job(key: str) -> Any:
    from benchmarks.jobs import store_job

    return store_job(api_key_id=key, batch_key="b", progress_total=0)


def measure(url: str, files: Path, reps: int) -> dict[str, float]:
    """Every cost once, on the store at ``url`` as it is seeded now."""
    from prometheus_client import CollectorRegistry, generate_latest

    from server.api.tasks.retention import sweep
    from server.api.telemetry import JobStoreCollector
    from server.jobs.store import Admission, JobStore, new_id
    from server.storage.local import LocalStorage

    store = JobStore.at(url)
    try:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(JobStoreCollector(store))
        storage = LocalStorage(files)
        template = template_job("k7")
        admission = Admission(queue_cap=10**9, per_key=10**9)

        def claim() -> None:
            job = store.claim("scale", ["edit"], 60)
            assert job is not None and job.lease_token is not None
            claim.held = job  # type: ignore[attr-defined]

        def claim_and_return() -> float:
            t = timed(claim, 1)
            held = claim.held  # type: ignore[attr-defined]
            store.release(held.id, held.lease_token)
            return t

        generate_latest(registry)  # warm: the first statement of each kind compiles it
        claim_and_return()
        out = {
            "metrics": timed(lambda: generate_latest(registry), reps),
            "claim": statistics.median(claim_and_return() for _ in range(reps)),
            "per_key": timed(lambda: store.in_flight("k7"), reps),
            "submit": timed(lambda: store.create(replace(template, id=new_id()), admission), reps),
            "retention": timed(lambda: sweep(store, storage, RETENTION_S), reps),
        }
    finally:
        store.close()
    out["startup"] = timed(lambda: startup(url), max(1, reps // 4))
    return out


def startup(url: str) -> None:
    from prometheus_client import CollectorRegistry

    from server.api.telemetry import JobStoreCollector
    from server.jobs.store import JobStore

    store = JobStore.at(url)
    try:
        store.migrate()
        CollectorRegistry(auto_describe=True).register(JobStoreCollector(store))  # as the app's registry does
        store.queued_count()
    finally:
        store.close()


def seed(url: str, *, finished: int = 0, queued: int = 0, first: int = 0) -> None:
    from server.jobs.seed import seed_jobs
    from server.jobs.store import JobStore, now_ms

    store = JobStore.at(url)
    try:
        store.migrate()
        seed_jobs(store.db, finished=finished, queued=queued, first=first, now=now_ms())
    finally:
        store.close()


def sweep_axis(
    backend: str, admin: str | None, folder: Path, axis: str, steps: tuple[int, ...], reps: int
) -> list[dict[str, Any]]:
    """Grow the store along ``axis`` ("stored" or "queued"), measuring every cost at each step."""
    rows: list[dict[str, Any]] = []
    with database(backend, admin, folder) as url:
        fixed = 100 if axis == "stored" else 1_000
        seed(url, finished=fixed if axis == "queued" else 0, queued=fixed if axis == "stored" else 0, first=10**8)
        have = 0
        for n in steps:
            t0 = time.perf_counter()
            if axis == "stored":
                seed(url, finished=n - have, first=have)
            else:
                seed(url, queued=n - have, first=have)
            seeded_s = time.perf_counter() - t0
            have = n
            costs = measure(url, folder / "files", reps)
            rows.append({"backend": backend, "axis": axis, axis: n, "seed_s": seeded_s, **costs})
            print(f"  {backend} {axis}={n}: " + ", ".join(f"{k} {costs[k]:.2f} ms" for k in COSTS), flush=True)
    return rows


def table(rows: list[dict[str, Any]], backend: str, axis: str) -> str:
    mine = [r for r in rows if r["backend"] == backend and r["axis"] == axis]
    body: list[list[Any]] = [[f"{r[axis]:,}", *(r[c] for c in COSTS)] for r in mine]
    if len(mine) > 1:
        first, last = mine[0], mine[-1]
        body.append([f"x {last[axis] // first[axis]:,}", *(f"x{last[c] / first[c]:.2f}" for c in COSTS)])
    columns = [f"{axis} jobs", *(f"{c} ms" for c in COSTS)]
    title = f"{backend}: cost (median ms) by jobs {axis}, and growth"
    return f"**{title}**\n\n" + print_table(title, columns, body)


def _idle_worker(url: str, run_dir: str, ready: Any, stop: Any, wakes: Any) -> None:
    """A stand-in worker process: wait on the jobs channel; when woken, claim (an unknown variant:
    it finds nothing and waits again, as a worker whose claim loses the race does)."""
    from server.jobs.store import JobStore

    store = JobStore.at(url, run_dir=Path(run_dir))
    sub = store.notifier.subscribe("jobs", template_job("").variant)  # a worker of the submits' variant
    ready.wait()
    try:
        while not stop.is_set():
            if sub.wait(0.2):
                with wakes.get_lock():
                    wakes.value += 1
                store.claim("idle", ["nothing-queued"], 60)
    finally:
        sub.close()
        store.close()


def notify_throughput(backend: str, admin: str | None, folder: Path, n: int, idle: int) -> tuple[float, float]:
    """Submits per second (store.create, no caps) while ``idle`` worker processes wait on the jobs
    channel, and wake-ups per submit (1.0: wake-one). Processes, as real workers are: threads of this
    one would measure the GIL instead."""
    import multiprocessing

    from server.jobs.store import JobStore, new_id

    ctx = multiprocessing.get_context("spawn")
    with database(backend, admin, folder) as url:
        run_dir = folder / f"run-{secrets.token_hex(3)}"
        store = JobStore.at(url, run_dir=run_dir)
        store.migrate()
        ready, stop, wakes = ctx.Barrier(idle + 1), ctx.Event(), ctx.Value("i", 0)
        procs = [
            ctx.Process(target=_idle_worker, args=(url, str(run_dir), ready, stop, wakes), daemon=True)
            for _ in range(idle)
        ]
        for proc in procs:
            proc.start()
        ready.wait(120)
        time.sleep(0.3)  # every subscriber back in its wait
        template = template_job("k7")
        t0 = time.perf_counter()
        for _ in range(n):
            store.create(replace(template, id=new_id()))
        rate = n / (time.perf_counter() - t0)
        settled = -1
        while settled != wakes.value:  # the last wake-ups still on their way
            settled = wakes.value
            time.sleep(0.5)
        stop.set()
        for proc in procs:
            proc.join(30)
        store.close()
    print(f"  {backend} notify: {idle} idle workers, {rate:.0f} submits/s, {wakes.value} wake-ups", flush=True)
    return rate, wakes.value / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--postgres", help="an admin URL (postgresql://…/postgres): also run on PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--stored", default=",".join(map(str, STORED)))
    parser.add_argument("--queued", default=",".join(map(str, QUEUED)))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--notify", type=int, default=0, help="submits per notifier run (0: skip)")
    parser.add_argument("--quick", action="store_true", help="tiny steps, few reps (CI)")
    args = parser.parse_args(argv)
    stored = tuple(int(s) for s in args.stored.split(","))
    queued = tuple(int(s) for s in args.queued.split(","))
    reps = args.reps
    if args.quick:
        stored, queued, reps = (100, 1_000), (10, 100), 3
        args.notify = args.notify or 20
    backends = ([] if args.no_sqlite else ["sqlite"]) + (["postgresql"] if args.postgres else [])
    rows: list[dict[str, Any]] = []
    tables: list[str] = []
    notify: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        folder = Path(tmp)
        for backend in backends:
            for axis, steps in (("stored", stored), ("queued", queued)):
                rows += sweep_axis(backend, args.postgres, folder, axis, steps, reps)
                tables.append(table(rows, backend, axis))
            if args.notify:
                idle_0, _ = notify_throughput(backend, args.postgres, folder, args.notify, 0)
                idle_4, wakes = notify_throughput(backend, args.postgres, folder, args.notify, 4)
                notify.append(
                    {"backend": backend, "idle_0": idle_0, "idle_4": idle_4, "ratio": idle_4 / idle_0, "wakes": wakes}
                )
    if notify:
        body = [[n["backend"], n["idle_0"], n["idle_4"], n["ratio"], n["wakes"]] for n in notify]
        columns = ["backend", "0 idle", "4 idle", "ratio", "wake-ups per submit"]
        tables.append(print_table("submits/s with idle workers", columns, body))
    write_json(args.out / "scale" / "scale.json", {"rows": rows, "notify": notify, "reps": reps})
    (args.out / "scale" / "scale.md").write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
