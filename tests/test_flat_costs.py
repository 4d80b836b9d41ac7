"""Costs flat in jobs stored and queued (issue 17): the claim, the per-key count and retention read
by indexes that match them (checked in the query plans of the statements the store really runs),
and the job counters behind /metrics agree with the rows whatever moved them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text

from server.jobs import seed
from server.jobs.contract import Status
from server.jobs.models import jobs
from server.jobs.store import Admission, JobStore, now_ms
from tests.test_store import expire_lease, make_job


def statements(store: JobStore, action: Callable[[], Any]) -> list[tuple[str, Any]]:
    """The SQL statements (and their parameters) that ``action`` runs on the store's engine."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(store.db.engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        event.remove(store.db.engine, "before_cursor_execute", record)
    return seen


def plan(store: JobStore, statement: str, parameters: Any) -> str:
    explain = "EXPLAIN " if store.db.is_postgres else "EXPLAIN QUERY PLAN "
    with store.db.read() as conn:
        rows = conn.exec_driver_sql(explain + statement, parameters).all()
    return "\n".join(" ".join(str(c) for c in row) for row in rows)


def plans_of(store: JobStore, action: Callable[[], Any], touching: str) -> list[str]:
    found = [plan(store, s, p) for s, p in statements(store, action) if touching in s and "jobs" in s]
    assert found, f"no statement with {touching!r} ran"
    return found


def assert_indexed(store: JobStore, found: str, index: str) -> None:
    assert index in found, found
    if store.db.is_postgres:
        assert "Seq Scan on jobs" not in found and "Sort" not in found, found
    else:
        assert "TEMP B-TREE" not in found and "SCAN jobs\n" not in found + "\n", found


@pytest.fixture
def big(store: JobStore) -> JobStore:
    # Enough rows that a planner prefers an index where one fits (and a sort would show).
    seed.seed_jobs(store.db, finished=20_000, queued=5_000, keys=50, now=now_ms())
    return store


def test_claim_walks_the_queued_jobs_index_in_order(big: JobStore) -> None:
    for found in plans_of(big, lambda: big.claim("w", ["edit"], 30), "ORDER BY"):
        assert_indexed(big, found, "ix_jobs_claim")
    for found in plans_of(big, lambda: big.claim_compatible("w", "b", 2, 30), "ORDER BY"):
        assert_indexed(big, found, "ix_jobs_claim_batch")


def test_the_claim_and_the_reaper_need_no_statistics_on_sqlite(big: JobStore) -> None:
    """SQLite plans without statistics until ANALYZE runs, and nothing runs it on an embedded store.
    The claim once took the lease index for its ``status = 'created'`` there, and read and sorted
    every queued job at each claim (7 ms at 20,000 queued); the lease index covers the running jobs
    only now (migration 0008), and these plans (the per-key count's and retention's too) hold with
    no statistics at all."""
    if big.db.is_postgres:
        pytest.skip("PostgreSQL analyses its tables itself (autovacuum)")
    with big.db.write() as conn:
        conn.execute(text("DELETE FROM sqlite_stat1"))
    big.db.engine.dispose()  # connections read the statistics when they open
    for found in plans_of(big, lambda: big.claim("w", ["edit"], 30), "ORDER BY"):
        assert_indexed(big, found, "ix_jobs_claim")
    for found in plans_of(big, lambda: big.claim_compatible("w", "b", 2, 30), "ORDER BY"):
        assert_indexed(big, found, "ix_jobs_claim_batch")
    for found in plans_of(big, big.reap, "lease_expires_at"):
        assert_indexed(big, found, "ix_jobs_lease")
    assert_indexed(big, plans_of(big, lambda: big.in_flight("k7"), "count")[0], "ix_jobs_in_flight")
    cutoff = now_ms() - 10 * seed.DAY_MS
    for found in plans_of(big, lambda: big.retention.purge_finished(cutoff, 500), "finished_at <"):
        assert_indexed(big, found, "ix_jobs_finished")


def test_per_key_count_and_queue_cap_touch_only_that_keys_jobs(big: JobStore) -> None:
    found = plans_of(big, lambda: big.in_flight("k7"), "count")
    assert_indexed(big, found[0], "ix_jobs_in_flight")
    # The queue cap reads a counter, not the queue.
    job = make_job(big)  # a template: a new id, stored with the caps on
    fresh = dataclasses.replace(job, id="a" * 32)
    ran = statements(big, lambda: big.create(fresh, Admission(queue_cap=10**6, per_key=10**6)))
    counts = [s for s, _ in ran if "count(" in s.lower()]
    assert len(counts) == 1 and "api_key_id" in counts[0], counts


def test_retention_with_nothing_due_is_an_index_probe(big: JobStore) -> None:
    cutoff = now_ms() - 10 * seed.DAY_MS
    for found in plans_of(big, lambda: big.retention.purge_finished(cutoff, 500), "finished_at <"):
        assert_indexed(big, found, "ix_jobs_finished")
    assert big.retention.purge_finished(cutoff, 500) == []


def actual_counts(store: JobStore) -> dict[str, int]:
    with store.db.read() as conn:
        rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
    counts = {s.value: 0 for s in Status}
    counts.update({str(status): int(n) for status, n in rows})
    return counts


def test_counters_follow_every_move_of_a_job(store: JobStore) -> None:
    made = [make_job(store) for _ in range(6)]
    # Cancelled before any claim: jobs made in the same millisecond are claimed in id order (random),
    # so a cancel after the claims could find its job already taken.
    assert store.cancel_queued(made[5].id, "cancelled")
    first = store.claim("w", ["edit"], 30)
    assert first is not None
    store.complete(first.id, first.lease_token or "", [], inference_ms=1200)
    second = store.claim("w", ["edit"], 30)
    assert second is not None
    store.fail(second.id, second.lease_token or "", "boom", 500)
    ahead = store.claim("w", ["edit"], 30, spend_attempt=False)
    assert ahead is not None and store.begin(ahead.id, ahead.lease_token or "") is not None
    running = store.claim("w", ["edit"], 30)
    assert running is not None
    expire_lease(store, running.id)
    assert store.reap() == 1  # back to the queue
    assert (
        store.count_by_status()
        == actual_counts(store)
        == {
            "created": 2,
            "processing": 1,
            "completed": 1,
            "failed": 2,
        }
    )
    assert store.queued_count() == 2
    gone = store.retention.purge_finished(now_ms() + 1, 500)
    assert len(gone) == 3 and store.count_by_status() == actual_counts(store)
    store.fold_counters()
    assert store.count_by_status() == actual_counts(store)
    counters = store.counters()
    # Three starts (the claim, the begin of the one claimed ahead, the reaped one's), one completion.
    assert counters["queue_wait.count"] == 4  # the claim ahead was no start: its begin was
    assert sum(v for name, v in counters.items() if name.startswith("queue_wait.le.")) == 4
    assert 0 <= counters["queue_wait.sum_ms"] <= 4 * (now_ms() - made[0].created_at)
    assert counters["inference.count"] == 1 and counters["inference.sum_ms"] == 1200
    assert counters["inference.le.2500"] == 1


def test_a_job_inserted_already_started_is_observed_as_a_start(store: JobStore) -> None:
    """A job handed to a worker by its submit (PostgreSQL: statements.SUBMIT) is inserted running,
    its attempt spent: the queue-wait histogram observes that start as it observes a claim's
    (migration 0009, on both databases, whichever code inserts such a row)."""
    from benchmarks.jobs import store_job
    from server.jobs import statements as sql

    queued = store_job(variant="edit")
    started = store_job(variant="edit", status=Status.PROCESSING, attempts=1, lease_token="t", lease_owner="w")
    started.started_at = started.created_at + 40
    with store.db.write() as conn:
        conn.execute(sql.INSERT_JOB, queued.to_row())
        conn.execute(sql.INSERT_JOB, started.to_row())
    counters = store.counters()
    assert counters["queue_wait.count"] == 1 and counters["queue_wait.sum_ms"] == 40
    assert counters["queue_wait.le.50"] == 1
    assert store.count_by_status() == actual_counts(store)


def test_upgrading_an_old_store_backfills_the_counters(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from server.jobs.db import MIGRATIONS

    store = JobStore.at(f"sqlite:///{tmp_path / 'jobs.db'}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.db.write() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        conn.execute(text("DELETE FROM jobs"))
    _seed_0004(store)  # an old store's rows, stored before the counters existed
    store.migrate()
    assert (
        store.count_by_status()
        == actual_counts(store)
        == {
            "created": 3,
            "processing": 0,
            "completed": 9,
            "failed": 1,
        }
    )
    assert store.counters()["inference.count"] == 9
    store.close()


def _seed_0004(store: JobStore) -> None:
    now = now_ms()
    with store.db.write() as conn:
        for i in range(13):
            status = "created" if i < 3 else "failed" if i == 3 else "completed"
            started = None if status == "created" else now
            conn.execute(
                text(
                    "INSERT INTO jobs (id, model, variant, status, priority, input, params, base_url, outputs, "
                    "output_format, base64_output, seed, error, attempts, max_attempts, cancel_requested, "
                    "progress_step, progress_total, inference_ms, created_at, started_at, finished_at, updated_at) "
                    "VALUES (:id, 'm', 'edit', :status, 0, '{}', '{}', '', '[]', 'png', 0, 1, '', 1, 3, 0, 0, 0, "
                    "900, :now, :started, :started, :now)"
                ),
                {"id": f"j{i}", "status": status, "now": now, "started": started},
            )
