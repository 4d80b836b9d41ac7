"""A job handed to the idle worker its submit picks (PostgreSQL, a real one): the submit's statement
inserts the job leased to that worker and sends it the job, so that the worker starts it without a
claim. A waiter that is no worker, a job too big for the message and a waiter whose connection died
get a queued job and a wake-up, as before; a handoff the worker cannot start goes back unspent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from benchmarks.jobs import store_job
from server.jobs.contract import HANDOFF_LEASE_S, Handoff, Job, Status
from server.jobs.store import JobStore, now_ms
from server.settings import Settings
from tests.support import FakeRunner, ThreadWorker, settings_for, wait_for
from tests.test_notify_postgres import LONG, Waiting, idle_rows


@pytest.fixture
def store(pg_url: str) -> Iterator[JobStore]:
    s = JobStore.open(Settings(database_url=pg_url))
    s.migrate()
    yield s
    s.close()


def handed(payloads: list[str] | None) -> Handoff:
    assert payloads is not None and len(payloads) == 1, payloads
    handoff = Handoff.parse(payloads[0])
    assert handoff is not None, payloads
    return handoff


def test_a_submit_hands_its_job_to_the_idle_worker_it_picks(store: JobStore) -> None:
    sub = store.notifier.subscribe("jobs", "edit", owner="host/0")
    waiting = Waiting([sub])
    wait_for(lambda: len(idle_rows(store)) == 1, 30, "the worker waiting")
    before = now_ms()
    job = store_job(variant="edit")
    store.create(job)
    wait_for(lambda: waiting.ended() == 1, LONG, "the handoff")
    got = handed(waiting.got[0]).job
    row = store.get(job.id)
    assert row is not None
    assert row.status is Status.PROCESSING and row.lease_owner == "host/0" and row.attempts == 1
    assert row.started_at is not None and before <= row.started_at <= now_ms()
    assert row.lease_expires_at == row.started_at + int(HANDOFF_LEASE_S * 1000)
    # What the worker was sent is the row, but for the owner (which it knows: its own id).
    assert got.lease_owner is None and {**got.to_row(), "lease_owner": "host/0"} == row.to_row()
    assert idle_rows(store) == []
    # A running job, as the counters and the queue-wait histogram see it.
    assert store.count_by_status()["processing"] == 1 and store.queued_count() == 0
    assert store.counters()["queue_wait.count"] == 1
    # The worker holds its lease as after a claim: it renews it and completes the job.
    assert store.heartbeat(job.id, got.lease_token or "", 60).alive
    assert store.complete(job.id, got.lease_token or "", ["out.png"], inference_ms=5)
    sub.close()


def test_a_waiter_that_is_no_worker_is_woken_and_the_job_queued(store: JobStore) -> None:
    sub = store.notifier.subscribe("jobs", "edit")  # no owner: a waiter of an older release
    waiting = Waiting([sub])
    wait_for(lambda: len(idle_rows(store)) == 1, 30, "the waiter waiting")
    job = store_job(variant="edit")
    store.create(job)
    wait_for(lambda: waiting.ended() == 1, LONG, "the wake-up")
    assert waiting.got == [["edit"]]
    row = store.get(job.id)
    assert row is not None and row.status is Status.CREATED and row.lease_owner is None and row.attempts == 0
    sub.close()


def test_a_worker_that_waits_for_any_variant_is_woken_not_handed_the_job(store: JobStore) -> None:
    # A variant whose name cannot be a topic waits for any ('*'): it may run another model.
    sub = store.notifier.subscribe("jobs", "not a topic!", owner="host/0")
    waiting = Waiting([sub])
    wait_for(lambda: _owners(store) == [("*", "host/0")], 30, "the worker waiting")
    job = store_job(variant="edit")
    store.create(job)
    wait_for(lambda: waiting.ended() == 1, LONG, "the wake-up")
    assert waiting.got == [["edit"]]
    row = store.get(job.id)
    assert row is not None and row.status is Status.CREATED and row.lease_owner is None
    sub.close()


def test_a_job_too_big_for_the_message_is_queued_and_its_worker_woken(store: JobStore) -> None:
    sub = store.notifier.subscribe("jobs", "edit", owner="host/0")
    waiting = Waiting([sub])
    wait_for(lambda: len(idle_rows(store)) == 1, 30, "the worker waiting")
    job = store_job(variant="edit", input={"prompt": "x" * 8000})
    store.create(job)
    wait_for(lambda: waiting.ended() == 1, LONG, "the wake-up")
    assert waiting.got == [["edit"]]
    row = store.get(job.id)
    assert row is not None and row.status is Status.CREATED
    claimed = store.claim("host/0", ["edit"], 60, woken=True)
    assert claimed is not None and claimed.id == job.id
    sub.close()


def test_a_waiter_whose_connection_died_is_not_handed_the_job(store: JobStore) -> None:
    with store.db.write() as conn:  # its process was killed in a wait: the row stays behind
        conn.execute(
            text(
                "INSERT INTO idle_waiters (channel, topic, pid, since, owner) "
                "VALUES ('qwen_edit_jobs_dead', 'edit', 0, 0, 'dead/0')"
            )
        )
    busy = store.notifier.subscribe("jobs", "edit", owner="host/0")
    assert busy.wait(0.01, ready=False) == []  # listening, not idle
    job = store_job(variant="edit")
    store.create(job)
    assert busy.wait(LONG, ready=False) == ["edit"]  # the shared channel: no one idle and alive
    row = store.get(job.id)
    assert row is not None and row.status is Status.CREATED and row.lease_owner is None
    busy.close()


def test_a_handoff_that_comes_after_its_wait_saw_the_row_taken_is_returned_by_that_wait(store: JobStore) -> None:
    # PostgreSQL signals a NOTIFY's listeners only once the notifying transaction has released its
    # locks and is visible: a wait ending for another reason just as a submit picked its row can
    # find the row gone before the submit's message is there. Left for a later wait, the handoff
    # sat unread while the worker ran queued jobs, until its lease ran out and the reaper queued
    # the job again (a CI run's job completed with 2 attempts). Here the submit's message is held
    # back until the wait has seen its row gone.
    sub = store.notifier.subscribe("jobs", "edit", owner="host/0")
    waiting = Waiting([sub])
    wait_for(lambda: len(idle_rows(store)) == 1, 30, "the worker waiting")
    pid = sub.conn.info.backend_pid  # type: ignore[attr-defined]
    with store.db.write() as conn:  # a submit picked the row and committed; its message is late
        channel = conn.execute(text("DELETE FROM idle_waiters RETURNING channel")).scalar_one()
    sub.wake()  # the wait ends for another reason (a stop, a pipeline freed)
    wait_for(lambda: _last_statement(store, pid).startswith("DELETE FROM idle_waiters"), 30, "its row removed")
    job = replace(store_job(variant="edit"), status=Status.PROCESSING, attempts=1, lease_token="t" * 32)
    message = Handoff(job).message()
    with store.db.write() as conn:
        conn.execute(text("SELECT pg_notify(:channel, :message)"), {"channel": channel, "message": message})
    wait_for(lambda: waiting.ended() == 1, LONG, "the wait")
    assert handed(waiting.got[0]).job.id == job.id
    assert idle_rows(store) == []
    sub.close()


def _last_statement(store: JobStore, pid: int) -> str:
    """The statement the backend ``pid`` runs, or ran last if it is idle."""
    with store.db.read() as conn:
        row = conn.execute(text("SELECT query, state FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}).one()
    return str(row.query) if row.state == "idle" else ""


def test_a_woken_worker_starts_the_handed_job_without_a_claim(tmp_path: Path, pg_url: str) -> None:
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from tests.test_worker import finished, submit

    # A poll far longer than the waits below: the worker must be ready again when its job ends, not
    # at its next poll (while its pipeline ran, its wait for the next job was not a ready one).
    settings = settings_for(tmp_path / "data", database_url=pg_url, poll_interval_s=120.0)
    worker = ThreadWorker(settings, FakeRunner(), worker_id="host/7")
    claimed: list[str] = []
    claim = worker.store._claim

    def counted(*args: Any, **kwargs: Any) -> list[Job]:
        jobs = claim(*args, **kwargs)
        claimed.extend(job.id for job in jobs)
        return jobs

    worker.store._claim = counted  # type: ignore[method-assign]
    with TestClient(create_app(settings)) as client:
        worker.start()
        try:
            ids = []
            for n in range(3):  # one at a time: each finds the worker idle again
                wait_for(
                    lambda: [owner for _, owner in _owners(worker.store)] == ["host/7"],
                    60,
                    f"the worker idle before job {n}",
                )
                ids.append(submit(client, f"edit {n}", num_inference_steps=4))
                assert finished(client, ids[-1])["status"] == "completed"
                job = worker.store.get(ids[-1])
                assert job is not None and job.attempts == 1
            assert not set(claimed) & set(ids)  # none of them was claimed
        finally:
            worker.stop()


def test_a_handoff_that_cannot_start_now_goes_back_unspent(tmp_path: Path, pg_url: str) -> None:
    """A handoff read after the wait it was meant for, while the worker claims ahead of a busy
    pipeline: released (its attempt refunded) and claimed like any queued job."""
    from pipelines.registry import get_variant
    from server.storage.factory import build_storage
    from server.worker.inbox import Inbox
    from server.worker.loop import Worker

    settings = settings_for(tmp_path / "data", database_url=pg_url)
    store = JobStore.open(settings)
    store.migrate()
    try:
        sub = store.notifier.subscribe("jobs", "edit", owner="host/3")
        waiting = Waiting([sub])
        wait_for(lambda: len(idle_rows(store)) == 1, 30, "the worker waiting")
        job = store_job(variant="edit")
        store.create(job)
        wait_for(lambda: waiting.ended() == 1, LONG, "the handoff")
        message = (waiting.got[0] or [""])[0]

        worker = Worker(settings, store, build_storage(settings), get_variant("edit"), "host/3")
        worker._sub = Inbox(_Replay([message]), worker.id)
        assert worker._sub.wait(0) == ["edit"]  # the handoff kept; its variant said
        ahead = worker.claim_next(spend_attempt=False)
        assert ahead is not None and ahead.id == job.id and ahead.attempts == 0  # claimed, unspent
        assert ahead.lease_token != handed([message]).job.lease_token
        assert worker._sub.take() is None
        sub.close()
    finally:
        store.close()


def test_an_idle_worker_takes_a_handoff_before_claiming(tmp_path: Path, pg_url: str) -> None:
    from pipelines.registry import get_variant
    from server.storage.factory import build_storage
    from server.worker.inbox import Inbox
    from server.worker.loop import Worker

    settings = settings_for(tmp_path / "data", database_url=pg_url)
    store = JobStore.open(settings)
    store.migrate()
    try:
        queued = store_job(variant="edit", created_at=now_ms() - 1000)
        store.create(queued)  # older than the handed one: a claim would take it first
        job = store_job(variant="edit")
        leased = Handoff(job).message()
        assert leased is not None
        worker = Worker(settings, store, build_storage(settings), get_variant("edit"), "host/4")
        worker._sub = Inbox(_Replay([leased, "", "garbled {"]), worker.id)
        assert worker._sub.wait(0) == ["edit", "", "garbled {"]
        assert worker.claim_next(spend_attempt=True) == Job(**{**vars(job), "lease_owner": "host/4"})
        nxt = worker.claim_next(spend_attempt=True)
        assert nxt is not None and nxt.id == queued.id
    finally:
        store.close()


class _Replay:
    """A subscription whose first wait returns ``payloads`` (messages as a notifier delivered them)."""

    def __init__(self, payloads: list[str]) -> None:
        self.payloads = payloads

    def wait(self, timeout: float, *, ready: bool = True) -> list[str]:
        got, self.payloads = self.payloads, []
        return got

    def wake(self) -> None:
        return None

    def close(self) -> None:
        return None


def _owners(store: JobStore) -> list[tuple[Any, ...]]:
    with store.db.read() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT topic, owner FROM idle_waiters"))]
