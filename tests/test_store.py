"""The job store on both databases it supports: SQLite (embedded) and a real PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from benchmarks.jobs import store_job
from server.errors import INTERNAL_ERROR
from server.jobs.contract import Done, Job, Status
from server.jobs.store import JobStore, new_id, now_ms
from server.settings import Settings

VARIANT = "edit"


def make_job(
    store: JobStore,
    *,
    priority: int = 0,
    created_at: int | None = None,
    max_attempts: int = 3,
    batch_key: str | None = None,
) -> Job:
    t = created_at if created_at is not None else now_ms()
    job = store_job(
        variant=VARIANT, max_attempts=max_attempts, created_at=t, updated_at=t, priority=priority, batch_key=batch_key
    )
    store.create(job)
    return job


def expire_lease(store: JobStore, job_id: str) -> None:
    """Push a running job's lease into the past, as if its worker had stopped renewing it."""
    from sqlalchemy import update

    from server.jobs.models import jobs

    with store.db.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(lease_expires_at=now_ms() - 1))


def test_migrate_twice_is_harmless(store: JobStore) -> None:
    store.migrate()
    store.ping()
    assert store.count_by_status() == {"created": 0, "processing": 0, "completed": 0, "failed": 0}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_many_processes_migrating_a_new_database_at_once(backend: str, tmp_path: Path) -> None:
    """Replicas and workers start together on an empty database: one creates the schema, the
    others wait for its commit and find it there (none fails with "table already exists")."""
    from tests.support import fresh_database

    def race(url: str) -> None:
        stores = [JobStore.at(url, pool_size=1) for _ in range(4)]
        start = threading.Barrier(len(stores))
        errors: list[BaseException] = []

        def migrate(s: JobStore) -> None:
            start.wait()
            try:
                s.migrate()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        try:
            assert not any(t.is_alive() for t in threads), "a migration hung"
            assert not errors, errors
            assert stores[0].count_by_status()["created"] == 0
        finally:
            for s in stores:
                s.close()

    # A race: give it several chances to show (a new SQLite file is cheap, a database is not).
    for attempt in range(12 if backend == "sqlite" else 3):
        if backend == "sqlite":
            race(f"sqlite:///{tmp_path / f'race{attempt}.db'}")
        else:
            with fresh_database() as url:
                race(Settings(database_url=url).resolved_database_url)


def test_claim_order_priority_then_age(store: JobStore) -> None:
    base = now_ms() - 10_000
    old_low = make_job(store, priority=0, created_at=base)
    new_high = make_job(store, priority=5, created_at=base + 2000)
    old_high = make_job(store, priority=5, created_at=base + 1000)
    new_low = make_job(store, priority=0, created_at=base + 3000)
    order = [store.claim("w", [VARIANT], 30) for _ in range(4)]
    assert [j.id for j in order if j] == [old_high.id, new_high.id, old_low.id, new_low.id]
    assert store.claim("w", [VARIANT], 30) is None
    first = order[0]
    assert first is not None
    assert first.status == Status.PROCESSING and first.attempts == 1 and first.lease_owner == "w"


def test_claim_only_own_variant(store: JobStore) -> None:
    make_job(store)
    assert store.claim("w", ["edit-plus"], 30) is None


def test_a_claim_that_finds_nothing_takes_no_write_lock_on_sqlite(tmp_path: Path) -> None:
    """SQLite has one writer: a worker woken for a job another one took (or polling an empty queue)
    must not queue behind, or hold up, the submits. Its claim answers while a writer holds the lock."""
    import sqlite3

    store = JobStore.at(f"sqlite:///{tmp_path / 'jobs.db'}", run_dir=tmp_path / "run")
    store.migrate()
    writer = sqlite3.connect(tmp_path / "jobs.db", timeout=0, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # another process's write transaction, held open
        assert store.claim("w", [VARIANT], 60) is None
        assert store.claim_compatible("w", "some-key", 4, 60) == []
        writer.execute("ROLLBACK")
        job = make_job(store)
        claimed = store.claim("w", [VARIANT], 60)
        assert claimed is not None and claimed.id == job.id
    finally:
        writer.close()
        store.close()


def test_a_woken_claim_goes_straight_to_its_write_on_sqlite(tmp_path: Path) -> None:
    """A worker picked to take a job just queued (woken for its variant) skips the look that keeps
    a claim finding nothing off the write lock: the job is there; the read would only delay it."""
    from tests.test_flat_costs import statements

    store = JobStore.at(f"sqlite:///{tmp_path / 'jobs.db'}", run_dir=tmp_path / "run")
    store.migrate()
    try:
        first, second = make_job(store), make_job(store)
        claimed: list[Job | None] = []
        looked = statements(store, lambda: claimed.append(store.claim("w", [VARIANT], 60)))
        woken = statements(store, lambda: claimed.append(store.claim("w", [VARIANT], 60, woken=True)))
        assert [job.id if job else None for job in claimed] == [first.id, second.id]
        # (BEGIN goes to the driver directly: the first statement here is what the transaction is for.)
        assert looked[0][0].lstrip().startswith("SELECT") and len(looked) > len(woken)
        assert not woken[0][0].lstrip().startswith("SELECT")  # nothing read before the write
        assert "UPDATE jobs" in woken[0][0]
    finally:
        store.close()


def test_claim_compatible_takes_only_same_key_jobs_in_order(store: JobStore) -> None:
    base = now_ms() - 10_000
    first = make_job(store, batch_key="k1", created_at=base)
    other = make_job(store, batch_key="k2", created_at=base + 1)
    alone = make_job(store, created_at=base + 2)  # no key: never batched
    late = make_job(store, batch_key="k1", created_at=base + 30)
    urgent = make_job(store, batch_key="k1", created_at=base + 20, priority=5)
    extra = make_job(store, batch_key="k1", created_at=base + 40)
    claimed = store.claim("w", [VARIANT], 30)
    assert claimed is not None and claimed.id == urgent.id and claimed.batch_key == "k1"
    more = store.claim_compatible("w", "k1", 2, 30)
    assert [j.id for j in more] == [first.id, late.id]
    assert all(j.status == Status.PROCESSING and j.lease_owner == "w" and j.attempts == 1 for j in more)
    assert store.claim_compatible("w", "k1", 0, 30) == []
    assert [j.id for j in store.claim_compatible("w2", "k1", 5, 30)] == [extra.id]
    assert store.claim_compatible("w", "k1", 5, 30) == []
    queued = {j.id for j in (store.claim("w", [VARIANT], 30), store.claim("w", [VARIANT], 30)) if j}
    assert queued == {other.id, alone.id}


def test_concurrent_batch_claimers_take_each_job_once(store: JobStore) -> None:
    ids = {make_job(store, batch_key="k").id for _ in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def claimer(k: int) -> None:
        start.wait()
        while batch := store.claim_compatible(f"w{k}", "k", 3, 30):
            with lock:
                claimed.extend(j.id for j in batch)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(ids)


def test_concurrent_claimers_take_each_job_once(store: JobStore) -> None:
    n_jobs, n_threads = 60, 6
    ids = {make_job(store).id for _ in range(n_jobs)}
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def claimer(k: int) -> None:
        try:
            start.wait()
            while True:
                job = store.claim(f"w{k}", [VARIANT], 30)
                if job is None:
                    return
                with lock:
                    claimed.append(job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert store.count_by_status()["processing"] == n_jobs


def test_lease_fencing_late_worker_cannot_finish(store: JobStore) -> None:
    job = make_job(store)
    first = store.claim("w1", [VARIANT], 30)
    assert first is not None and first.lease_token
    expire_lease(store, job.id)
    assert store.reap() == 1
    second = store.claim("w2", [VARIANT], 30)
    assert second is not None and second.id == job.id and second.attempts == 2
    assert second.lease_token != first.lease_token
    # The first worker comes back: every write it makes matches no row.
    assert not store.heartbeat(job.id, first.lease_token, 30).alive
    assert not store.complete(job.id, first.lease_token, ["outputs/x/late.png"], 10)
    assert not store.fail(job.id, first.lease_token, "late", 1500)
    assert not store.release(job.id, first.lease_token)
    assert second.lease_token and store.heartbeat(job.id, second.lease_token, 30).alive
    assert store.complete(job.id, second.lease_token, ["outputs/x/ok.png"], 10)
    done = store.get(job.id)
    assert done is not None and done.status == Status.COMPLETED and done.outputs == ["outputs/x/ok.png"]
    assert done.attempts == 2 and done.lease_token is None
    # Finished is final.
    assert not store.complete(job.id, second.lease_token, ["outputs/x/again.png"], 10)


def test_reap_requeues_then_fails_at_the_attempts_cap(store: JobStore) -> None:
    job = make_job(store, max_attempts=2)
    live = make_job(store)
    for attempt in (1, 2):
        claimed = store.claim("w", [VARIANT], 30)
        assert claimed is not None and claimed.id == job.id and claimed.attempts == attempt
        expire_lease(store, job.id)
        assert store.reap() == 1
    failed = store.get(job.id)
    assert failed is not None and failed.status == Status.FAILED
    assert "stopped 2 times" in failed.error and failed.error_code == INTERNAL_ERROR
    # A job whose lease is still fresh is left alone.
    running = store.claim("w", [VARIANT], 30)
    assert running is not None and running.id == live.id
    assert store.reap() == 0
    assert store.get(live.id).status == Status.PROCESSING  # type: ignore[union-attr]


def test_release_hands_back_without_spending_an_attempt(store: JobStore) -> None:
    job = make_job(store)
    claimed = store.claim("w1", [VARIANT], 30)
    assert claimed is not None and claimed.lease_token
    assert store.release(job.id, claimed.lease_token)
    back = store.get(job.id)
    assert back is not None and back.status == Status.CREATED and back.attempts == 0 and back.lease_token is None
    again = store.claim("w2", [VARIANT], 30)
    assert again is not None and again.id == job.id and again.attempts == 1


def test_a_heartbeat_renews_the_lease_and_reports_progress_only_when_given(store: JobStore) -> None:
    make_job(store)
    claimed = store.claim("w", [VARIANT], 30)
    assert claimed is not None and claimed.lease_token and claimed.lease_expires_at
    assert store.heartbeat(claimed.id, claimed.lease_token, 300, 3, 8).alive
    renewed = store.get(claimed.id)
    assert renewed is not None and (renewed.progress_step, renewed.progress_total) == (3, 8)
    assert renewed.lease_expires_at and renewed.lease_expires_at > claimed.lease_expires_at + 200_000
    assert store.heartbeat(claimed.id, claimed.lease_token, 300).alive  # no progress: it stays
    same = store.get(claimed.id)
    assert same is not None and (same.progress_step, same.progress_total) == (3, 8)
    # Handed back unspent (claimed ahead, never begun): the attempt stays, the progress goes.
    assert store.release(claimed.id, claimed.lease_token, refund=False)
    back = store.get(claimed.id)
    assert back is not None and back.attempts == 1 and back.progress_step == 0 and back.lease_owner is None
    assert not store.heartbeat(claimed.id, claimed.lease_token, 300).alive


def test_every_end_tells_its_listeners_the_finished_row(store: JobStore) -> None:
    """The ``done`` message of a completion, a failure, a cancel and a reap carries what the end
    wrote: applied to the job as created, it is the row read afterwards, so a sync answer needs no
    read. An ending too big for a message (a long error) is left out: the listener reads the row."""
    sub = store.notifier.subscribe("done")  # listening from here on
    try:
        base = now_ms() - 10_000
        created = [make_job(store, created_at=base + i, max_attempts=1) for i in range(5)]
        done_ok, done_failed, done_long, cancelled, reaped = created
        first = store.claim("w", [VARIANT], 60)
        assert first is not None and first.id == done_ok.id and first.lease_token
        assert store.complete(first.id, first.lease_token, ["outputs/a.png", "outputs/b.png"], 123, 2, [False, True])
        for job, error in ((done_failed, "the edit failed"), (done_long, "x" * 10_000)):
            claimed = store.claim("w", [VARIANT], 60)
            assert claimed is not None and claimed.id == job.id and claimed.lease_token
            assert store.fail(claimed.id, claimed.lease_token, error, INTERNAL_ERROR, 7)
        assert store.cancel_queued(cancelled.id, "gone")
        assert store.claim("w", [VARIANT], 60) is not None
        expire_lease(store, reaped.id)
        assert store.reap() == 1  # its one attempt spent: it fails

        heard: dict[str, Done] = {}
        deadline = time.monotonic() + 10
        while len(heard) < len(created) and time.monotonic() < deadline:
            for done in map(Done.parse, sub.wait(0.5)):
                if done is not None and done.job_id in {job.id for job in created}:
                    heard[done.job_id] = done
        assert set(heard) == {job.id for job in created}
        for job in created:
            row, ending = store.get(job.id), heard[job.id].ending
            assert row is not None and row.status.terminal
            if job is done_long:
                assert ending is None  # the message stays under the notifiers' limit
                continue
            assert ending is not None and job.ended(ending) == row
        assert heard[done_ok.id].ending and heard[done_ok.id].ending.outputs == ["outputs/a.png", "outputs/b.png"]
    finally:
        sub.close()


def test_an_end_without_the_lease_writes_and_tells_nothing(store: JobStore) -> None:
    """A completion or failure with a lease that is gone (a late or duplicate worker) matches no
    row: nothing is written and no ``done`` goes out (on PostgreSQL the NOTIFY is the ending's own
    statement's, sent only for a row it ended)."""
    sub = store.notifier.subscribe("done")
    try:
        job = make_job(store)
        claimed = store.claim("w", [VARIANT], 60)
        assert claimed is not None and claimed.id == job.id and claimed.lease_token
        assert not store.complete(job.id, "not-its-lease", ["outputs/late.png"], 1)
        assert not store.fail(job.id, "not-its-lease", "late", INTERNAL_ERROR)
        assert store.complete(job.id, claimed.lease_token, ["outputs/a.png"], 5)
        assert not store.complete(job.id, claimed.lease_token, ["outputs/twice.png"], 1)  # ended: the lease with it
        heard: list[Done] = []
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:  # messages come in commit order
            heard += [d for d in map(Done.parse, sub.wait(0.5)) if d is not None and d.job_id == job.id]
        assert len(heard) == 1 and heard[0].ending is not None and heard[0].ending.outputs == ["outputs/a.png"]
        row = store.get(job.id)
        assert row is not None and row.status == Status.COMPLETED and row.outputs == ["outputs/a.png"]
    finally:
        sub.close()


def test_release_owned_by_a_previous_life(store: JobStore) -> None:
    job = make_job(store)
    assert store.claim("host/0", [VARIANT], 30) is not None
    assert store.release_owned_by("host/1") == 0
    assert store.release_owned_by("host/0") == 1
    back = store.get(job.id)
    assert back is not None and back.status == Status.CREATED


def test_cancel_queued_and_running(store: JobStore) -> None:
    queued = make_job(store)
    running = make_job(store, priority=1)
    claimed = store.claim("w", [VARIANT], 30)
    assert claimed is not None and claimed.id == running.id and claimed.lease_token
    after = store.cancel(queued.id)
    assert after is not None and after.status == Status.FAILED and after.error_code == 1403
    asked = store.cancel(running.id)
    assert asked is not None and asked.status == Status.PROCESSING and asked.cancel_requested
    beat = store.heartbeat(running.id, claimed.lease_token, 30)
    assert beat.alive and beat.cancel_requested
    assert store.fail(running.id, claimed.lease_token, "Cancelled by the client while running.", 1403)
    assert store.get(running.id).status == Status.FAILED  # type: ignore[union-attr]
    assert store.cancel(new_id()) is None


def test_webhook_outbox_claim_and_result(store: JobStore) -> None:
    job = Job(**{**make_job(store).__dict__, "id": new_id(), "webhook_url": "http://127.0.0.1:9/hook"})
    store.create(job)
    claimed = store.claim("w", [VARIANT], 30)
    while claimed is not None and claimed.id != job.id:
        claimed = store.claim("w", [VARIANT], 30)
    assert claimed is not None and claimed.lease_token
    assert store.outbox.claim(10, 30, now_ms()) == []  # nothing until the job ends
    assert store.complete(job.id, claimed.lease_token, ["outputs/a.png"], 5)
    tasks = store.outbox.claim(10, 30, now_ms())
    assert [(t.job_id, t.url, t.attempts) for t in tasks] == [(job.id, "http://127.0.0.1:9/hook", 0)]
    assert store.outbox.claim(10, 30, now_ms()) == []  # leased: nobody else takes it
    store.outbox.record(job.id, error="connection refused", retry_at=now_ms() - 1, now=now_ms())
    retry = store.outbox.claim(10, 30, now_ms())
    assert [t.attempts for t in retry] == [1]
    store.outbox.record(job.id, error=None, retry_at=None, now=now_ms())
    state = store.outbox.state(job.id)
    assert state is not None and state["delivered_at"] is not None and state["attempts"] == 2
    assert store.outbox.claim(10, 30, now_ms()) == []


def test_a_failure_queues_the_delivery_of_a_job_with_a_webhook_only(store: JobStore) -> None:
    """Ending a job writes its delivery with it (PostgreSQL in the same statement, SQLite in the same
    transaction): one for a job with a webhook, none without, none again for a late second end."""
    hooked = Job(**{**make_job(store).__dict__, "id": new_id(), "webhook_url": "http://127.0.0.1:9/f"})
    plain = Job(**{**make_job(store).__dict__, "id": new_id()})
    for job in (hooked, plain):
        store.create(job)
    leases = {}
    while (c := store.claim("w", [VARIANT], 30)) is not None:
        leases[c.id] = c.lease_token
    assert store.fail(hooked.id, leases[hooked.id], "boom", INTERNAL_ERROR, 3)
    assert store.complete(plain.id, leases[plain.id], ["outputs/p.png"], 4)
    assert not store.fail(hooked.id, leases[hooked.id], "late", INTERNAL_ERROR)  # the lease is gone
    deliveries = store.outbox.claim(10, 30, now_ms())
    assert [(d.job_id, d.url, d.attempts) for d in deliveries] == [(hooked.id, "http://127.0.0.1:9/f", 0)]
    ended = store.get(hooked.id)
    assert ended is not None and (ended.status, ended.error, ended.inference_ms) == (Status.FAILED, "boom", 3)


def test_concurrent_webhook_claimers_split_the_outbox(store: JobStore) -> None:
    ids = []
    for _ in range(12):
        job = Job(**{**make_job(store).__dict__, "id": new_id(), "webhook_url": "http://127.0.0.1:9/h"})
        store.create(job)
        ids.append(job.id)
    while (c := store.claim("w", [VARIANT], 30)) is not None:
        assert c.lease_token and store.complete(c.id, c.lease_token, [], 1)
    got: list[str] = []
    lock = threading.Lock()

    def take() -> None:
        for t in store.outbox.claim(5, 30, now_ms()):
            with lock:
                got.append(t.job_id)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == len(set(got))
    assert set(got) <= set(ids) and len(got) == 12


def test_meta_value_first_writer_wins(store: JobStore) -> None:
    values: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def read(k: int) -> None:
        start.wait()
        v = store.workers.meta_value("secret", lambda: f"value-{k}-{time.monotonic_ns()}")
        with lock:
            values.append(v)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(values) == 8 and len(set(values)) == 1
    assert store.workers.meta_value("secret", lambda: "other") == values[0]


def test_an_unreachable_database_is_store_unavailable() -> None:
    """The driver's errors never leave the store: a refused connection is ``StoreUnavailable``."""
    from server.errors import StoreUnavailable

    store = JobStore.at("postgresql+psycopg://postgres@127.0.0.1:1/nowhere", pool_size=1)
    try:
        with pytest.raises(StoreUnavailable):
            store.ping()
        with pytest.raises(StoreUnavailable):
            store.get("abc")
    finally:
        store.close()


def test_connections_the_database_closed_are_replaced_not_failed(pg_url: str) -> None:
    """A database restart closes every pooled connection: the calls after it reconnect, none fails."""
    from tests.support import terminate_sessions

    store = JobStore.open(Settings(database_url=pg_url), pool_size=4)
    store.migrate()
    try:
        job = make_job(store)
        # Four idle pooled connections, each checked out at once so that the pool keeps four.
        with store.db.engine.connect(), store.db.engine.connect(), store.db.engine.connect():
            assert store.get(job.id) is not None
        assert terminate_sessions(pg_url) >= 4
        for _ in range(8):  # the pool hands its connections out in turn: every stale one is met
            got = store.get(job.id)
            assert got is not None and got.id == job.id
        store.ping()
    finally:
        store.close()


def test_the_queue_cap_is_hard_under_concurrent_submits(store: JobStore) -> None:
    """Count and insert are one transaction: 60 racing submits against a cap of 12 leave 12."""
    from server.jobs.store import Admission, QueueFull

    cap, tries = 12, 60
    accepted: list[str] = []
    refused: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def submitter(n: int) -> None:
        start.wait()
        for _ in range(n):
            job = store_job(variant=VARIANT, input={}, base_url="", steps=1, max_attempts=1, api_key_id="k")
            try:
                store.create(job, Admission(queue_cap=cap))
                with lock:
                    accepted.append(job.id)
            except QueueFull:
                with lock:
                    refused.append(1)

    threads = [threading.Thread(target=submitter, args=(tries // 6,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(accepted) == cap and len(refused) == tries - cap
    assert store.queued_count() == cap


def test_the_per_key_cap_is_checked_with_the_insert(store: JobStore) -> None:
    from server.jobs.store import Admission, KeyAtLimit

    make_job(store)  # api_key_id None: the anonymous caller's
    with pytest.raises(KeyAtLimit):
        store.create(Job(**{**make_job(store).__dict__, "id": new_id()}), Admission(queue_cap=100, per_key=2))
    assert store.in_flight(None) == 2
