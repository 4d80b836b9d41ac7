"""Job counters kept beside the jobs, so that ``/metrics``, ``/readyz`` and the queue cap read a
handful of rows instead of counting millions of job rows.

* ``jobs.<status>``: jobs per status. Database triggers (migration 0005) change them in the very
  statement that inserts, moves or deletes a job, whichever code path does it (claims, reaps,
  retention, history deletes), so they can never drift from the rows.
* ``<histogram>.count|sum_ms|le.<bound ms>|le.inf``: the queue-wait and inference histograms,
  one (non-cumulative) bucket per observation, added by triggers too (migration 0007) in the
  statement that starts or completes the job. They only grow: retention deleting jobs no longer
  reads as a counter reset.

SQLite updates the totals (``job_stats``) in place: its writers are serialised anyway. PostgreSQL
appends to ``job_stat_deltas`` instead: concurrent submits, claims and completions never wait on one
hot counter row (nor deadlock over two), and ``fold()`` (the API's reaper, every few seconds) moves
the deltas into the totals. Readers sum both in one statement, so they see one snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, func, insert, select, text, union_all

from server.jobs.models import job_stat_deltas, job_stats

# Histogram bucket bounds (ms): the Prometheus buckets of qwen_edit_queue_wait_seconds and
# qwen_edit_inference_seconds. A counter is named by its bound, so changing them later only starts
# new counters; the triggers that observe them (migration 0007) are written with the bounds of the
# day: a change needs a migration that writes them again.
BOUNDS_MS: tuple[int, ...] = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 30000, 60000, 120000, 180000, 300000)
QUEUE_WAIT = "queue_wait"
INFERENCE = "inference"
_FOLD_LOCK = 727003  # PostgreSQL advisory lock id: one fold at a time (two would contend on totals)
FOLD_BATCH = 100_000


# One counter (the queue cap's queued jobs), by dialect: an index lookup, plus its unfolded deltas
# (binds ``name``; JobStore._queued runs it on the driver).
ONE = {
    "sqlite": select(func.coalesce(func.sum(job_stats.c.value), 0)).where(job_stats.c.name == bindparam("name")),
    # One statement: one snapshot, even if a fold commits meanwhile.
    "postgresql": select(
        func.coalesce(
            func.sum(
                union_all(
                    select(job_stats.c.value.label("v")).where(job_stats.c.name == bindparam("name")),
                    select(job_stat_deltas.c.delta.label("v")).where(job_stat_deltas.c.name == bindparam("name")),
                )
                .subquery()
                .c.v
            ),
            0,
        )
    ),
}


@dataclass(frozen=True)
class Histogram:
    count: int
    sum_ms: int
    cumulative: tuple[int, ...]  # one count per bucket bound, in order


def read(conn: Connection, prefix: str = "") -> dict[str, int]:
    """Every counter (or those whose name starts with ``prefix``): totals plus deltas not yet folded."""
    totals = select(job_stats.c.name, job_stats.c.value.label("v"))
    deltas = select(job_stat_deltas.c.name, job_stat_deltas.c.delta.label("v"))
    if prefix:
        totals = totals.where(job_stats.c.name.startswith(prefix, autoescape=True))
        deltas = deltas.where(job_stat_deltas.c.name.startswith(prefix, autoescape=True))
    parts = union_all(totals, deltas).subquery() if conn.dialect.name == "postgresql" else totals.subquery()
    rows = conn.execute(select(parts.c.name, func.sum(parts.c.v)).group_by(parts.c.name)).all()
    return {str(name): int(v or 0) for name, v in rows}


def histogram(counters: Mapping[str, int], name: str) -> Histogram:
    cumulative: list[int] = []
    running = 0
    for bound in BOUNDS_MS:
        running += counters.get(f"{name}.le.{bound}", 0)
        cumulative.append(running)
    return Histogram(counters.get(f"{name}.count", 0), counters.get(f"{name}.sum_ms", 0), tuple(cumulative))


def fold(conn: Connection) -> int:
    """Move unfolded deltas into the totals (PostgreSQL; a no-op on SQLite); the rows folded."""
    if conn.dialect.name != "postgresql":
        return 0
    if not conn.execute(text(f"SELECT pg_try_advisory_xact_lock({_FOLD_LOCK})")).scalar_one():
        return 0  # another replica is folding right now
    moved = conn.execute(
        text(
            "WITH gone AS (DELETE FROM job_stat_deltas WHERE id IN "
            "  (SELECT id FROM job_stat_deltas ORDER BY id LIMIT :n) RETURNING name, delta), "
            "sums AS (SELECT name, sum(delta) AS value, count(*) AS n FROM gone GROUP BY name), "
            "upserted AS (INSERT INTO job_stats (name, value) SELECT name, value FROM sums "
            "  ON CONFLICT (name) DO UPDATE SET value = job_stats.value + EXCLUDED.value) "
            "SELECT coalesce(sum(n), 0) FROM sums"
        ),
        {"n": FOLD_BATCH},
    ).scalar_one()
    return int(moved)


def rebuild(conn: Connection) -> None:
    """Recount every counter from the job rows (O(jobs): the migration's backfill, or a store
    seeded with its triggers off, as the scale benchmark does)."""
    conn.execute(job_stats.delete())
    if conn.dialect.name == "postgresql":
        conn.execute(job_stat_deltas.delete())
    conn.execute(text(BACKFILL_STATUS))
    for stmt in BACKFILL_HISTOGRAMS:
        conn.execute(text(stmt))
    for status in ("created", "processing", "completed", "failed"):
        exists = select(job_stats.c.name).where(job_stats.c.name == f"jobs.{status}")
        if conn.execute(exists).first() is None:  # the triggers update these rows: they must exist
            conn.execute(insert(job_stats).values(name=f"jobs.{status}", value=0))


def bucket_case(expr: str, histogram: str) -> str:
    """SQL naming the bucket counter of ``expr`` (ms) in ``histogram``."""
    whens = " ".join(f"WHEN {expr} <= {b} THEN '{histogram}.le.{b}'" for b in BOUNDS_MS)
    return f"CASE {whens} ELSE '{histogram}.le.inf' END"


def sqlite_histogram_trigger(trigger: str, histogram: str, value: str, event: str, when: str) -> str:
    """SQLite: the trigger ``trigger`` that observes ``value`` (ms) in ``histogram`` (its count, sum
    and bucket) at ``event`` on ``jobs``, for a started job where ``when`` holds (migrations 0007,
    0009). PostgreSQL's triggers call a function per histogram instead, which appends deltas."""

    def add(name: str, delta: str) -> str:
        return (
            f"INSERT INTO job_stats (name, value) VALUES ({name}, {delta}) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;"
        )

    return (
        f"CREATE TRIGGER {trigger} AFTER {event} ON jobs "
        f"WHEN {when} AND NEW.started_at IS NOT NULL BEGIN "
        f"{add(repr(f'{histogram}.count'), '1')} "
        f"{add(repr(f'{histogram}.sum_ms'), value)} "
        f"{add(bucket_case(value, histogram), '1')} END"
    )


def _histogram_backfill(histogram: str, expr: str, where: str) -> list[str]:
    return [
        f"INSERT INTO job_stats (name, value) SELECT '{histogram}.count', count(*) FROM jobs WHERE {where}",
        f"INSERT INTO job_stats (name, value) SELECT '{histogram}.sum_ms', coalesce(sum({expr}), 0) "
        f"FROM jobs WHERE {where}",
        f"INSERT INTO job_stats (name, value) SELECT b, count(*) FROM "
        f"(SELECT {bucket_case(expr, histogram)} AS b FROM jobs WHERE {where}) AS t GROUP BY b",
    ]


BACKFILL_STATUS = "INSERT INTO job_stats (name, value) SELECT 'jobs.' || status, count(*) FROM jobs GROUP BY status"
BACKFILL_HISTOGRAMS = [
    *_histogram_backfill(QUEUE_WAIT, "(started_at - created_at)", "started_at IS NOT NULL"),
    *_histogram_backfill(INFERENCE, "inference_ms", "status = 'completed'"),
]
