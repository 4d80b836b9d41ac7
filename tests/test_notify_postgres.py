"""Wake-ups across machines (PostgresNotifier, a real PostgreSQL): a queued job wakes ONE idle
worker of its variant through that worker's own channel (issue 17); with none idle, every worker
finds it on the shared channel at its next wait; a wait returns at its first notification, not at
its timeout; ``done`` reaches every listener; a dead waiter's row is forgotten."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text

from benchmarks.jobs import store_job
from server.jobs.notify import Subscription
from server.jobs.store import JobStore
from server.settings import Settings
from tests.support import fresh_database, wait_for

LONG = 60.0  # a wait's timeout: every wait below must end long before it, woken


@pytest.fixture
def store() -> Iterator[JobStore]:
    with fresh_database() as url:
        store = JobStore.at(Settings(database_url=url).resolved_database_url)
        store.migrate()
        try:
            yield store
        finally:
            store.close()


def idle_rows(store: JobStore) -> list[tuple[Any, ...]]:
    with store.db.read() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT topic, pid FROM idle_waiters ORDER BY topic"))]


class Waiting:
    """Each subscription waits once (timeout LONG), on its own thread; ``got[i]`` once it returned."""

    def __init__(self, subs: list[Subscription]) -> None:
        self.got: list[list[str] | None] = [None] * len(subs)
        self.threads = [threading.Thread(target=self._run, args=(i, sub)) for i, sub in enumerate(subs)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int, sub: Subscription) -> None:
        self.got[i] = sub.wait(LONG)

    def ended(self) -> int:
        return sum(1 for g in self.got if g is not None)


def test_a_queued_job_wakes_one_idle_worker_of_its_variant(store: JobStore) -> None:
    notifier = store.notifier
    edit = [notifier.subscribe("jobs", "edit") for _ in range(3)]
    plus = notifier.subscribe("jobs", "edit-plus")
    waiting = Waiting([*edit, plus])
    wait_for(lambda: len(idle_rows(store)) == 4, 30, "every worker waiting")

    store.db.publish("jobs", "edit")
    wait_for(lambda: waiting.ended() == 1, 30, "one wake-up, well before the wait's timeout")
    assert sorted(g for g in waiting.got[:3] if g is not None) == [["edit"]]
    assert waiting.got[3] is None  # another variant's worker slept on
    # The woken one left the idle list; the two other edit workers and edit-plus are still on it.
    wait_for(lambda: len(idle_rows(store)) == 3, 30, "the woken worker to leave the idle list")
    assert [topic for topic, _ in idle_rows(store)] == ["edit", "edit", "edit-plus"]

    store.db.publish("jobs")  # a reaped or released job, no variant: any worker may want it
    wait_for(lambda: waiting.ended() == 4, 30, "every other waiter")
    assert [g for g in waiting.got if g != ["edit"]] == [[""]] * 3
    assert idle_rows(store) == []
    for sub in [*edit, plus]:
        sub.close()


def test_with_no_one_idle_every_worker_finds_it_at_its_next_wait(store: JobStore) -> None:
    busy = [store.notifier.subscribe("jobs", "edit") for _ in range(2)]
    for sub in busy:  # connected and listening, then busy (between a claim and a wait)
        assert sub.wait(0.01, ready=False) == []
    assert idle_rows(store) == []
    store.db.publish("jobs", "edit")
    assert [sub.wait(LONG) for sub in busy] == [["edit"], ["edit"]]
    for sub in busy:
        sub.close()


def test_a_submit_notifies_its_pick_inside_its_own_transaction(store: JobStore) -> None:
    from tests.test_store import make_job

    sub = store.notifier.subscribe("jobs", "edit")
    waiting = Waiting([sub])
    wait_for(lambda: len(idle_rows(store)) == 1, 30, "the worker waiting")
    make_job(store)  # store.create: the insert, the pick and the NOTIFY commit together
    wait_for(lambda: waiting.ended() == 1, 30, "the wake-up")
    assert waiting.got == [["edit"]]
    sub.close()


def test_a_refused_submit_wakes_no_one(store: JobStore) -> None:
    """The pick, the NOTIFY and the admission lock share the job's statement: a submit the caps
    refuse rolls them back with the job (the idle waiter stays idle, picked by the next one)."""
    from server.jobs.store import Admission, QueueFull
    from tests.test_store import make_job

    make_job(store)  # the queue is full at a cap of 1
    sub = store.notifier.subscribe("jobs", "edit")
    waiting = Waiting([sub])
    wait_for(lambda: len(idle_rows(store)) == 1, 30, "the worker waiting")
    refused = store_job(variant="edit", input={}, base_url="", steps=1, max_attempts=1)
    with pytest.raises(QueueFull):
        store.create(refused, Admission(queue_cap=1))
    assert store.get(refused.id) is None
    assert len(idle_rows(store)) == 1  # not picked
    store.create(store_job(variant="edit", input={}, base_url="", steps=1, max_attempts=1), Admission(queue_cap=2))
    wait_for(lambda: waiting.ended() == 1, 30, "the wake-up")
    assert waiting.got == [["edit"]] and idle_rows(store) == []
    sub.close()


def test_a_submit_against_the_queue_cap_alone_is_one_statement(store: JobStore) -> None:
    """The default caps (the queue's alone): the job, the pick, the admission lock and the queue's
    count in one statement in autocommit, one round trip with no BEGIN or COMMIT (the count in
    migration 0010's qwen_edit_admit, in a snapshot taken after the lock). A per-key cap still has
    its count in a statement of its own, in a transaction, after the lock."""
    from server.jobs.store import Admission
    from tests.test_flat_costs import statements

    commits: list[int] = []

    def commit(_conn: Any) -> None:
        commits.append(1)

    event.listen(store.db.engine, "commit", commit)
    try:
        job = store_job(variant="edit", input={}, base_url="", steps=1, max_attempts=1, api_key_id="k")
        ran = [sql for sql, _ in statements(store, lambda: store.create(job, Admission(queue_cap=5)))]
        assert len(ran) == 1 and "qwen_edit_admit" in ran[0] and commits == [], ran
        assert store.get(job.id) is not None and store.queued_count() == 1
        keyed = store_job(variant="edit", input={}, base_url="", steps=1, max_attempts=1, api_key_id="k")
        ran = [sql for sql, _ in statements(store, lambda: store.create(keyed, Admission(queue_cap=5, per_key=5)))]
        assert "pg_advisory_xact_lock" in ran[0] and any("count(" in sql.lower() for sql in ran[1:]), ran
        assert commits == [1] and store.queued_count() == 2
    finally:
        event.remove(store.db.engine, "commit", commit)


def test_a_worker_told_to_stop_wakes_from_its_wait_at_once(store: JobStore) -> None:
    sub = store.notifier.subscribe("jobs", "edit")
    waiting = Waiting([sub])
    wait_for(lambda: len(idle_rows(store)) == 1, 30, "the worker waiting")
    sub.wake()  # from another thread, as drain() does
    wait_for(lambda: waiting.ended() == 1, 30, "the wait to end")
    assert idle_rows(store) == []
    sub.close()


def test_done_reaches_every_listener_at_once(store: JobStore) -> None:
    done = [store.notifier.subscribe("done") for _ in range(2)]
    waiting = Waiting(done)
    wait_for(lambda: _listeners(store, "qwen_edit_done") == 2, 30, "both listening")
    store.db.publish("done", "abc")
    wait_for(lambda: waiting.ended() == 2, 30, "both wake-ups")
    assert waiting.got == [["abc"], ["abc"]]
    for sub in done:
        sub.close()


def test_a_waiter_that_died_is_forgotten(store: JobStore) -> None:
    with store.db.write() as conn:  # its process was killed in a wait: the row stays behind
        conn.execute(
            text("INSERT INTO idle_waiters (channel, topic, pid, since) VALUES ('qwen_edit_jobs_dead', 'edit', 0, 0)")
        )
    alive = store.notifier.subscribe("jobs", "edit")
    waiting = Waiting([alive])
    wait_for(lambda: [pid != 0 for _, pid in idle_rows(store)] == [True], 30, "the dead row gone, the live one there")
    store.db.publish("jobs", "edit")
    wait_for(lambda: waiting.ended() == 1, 30, "the wake-up")
    assert waiting.got == [["edit"]]
    alive.close()


def _listeners(store: JobStore, channel: str) -> int:
    """Sessions whose last statement was LISTEN on ``channel`` (a listener between waits)."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = :q"
    with store.db.read() as conn:
        return int(conn.execute(text(sql), {"q": f"LISTEN {channel}"}).scalar_one())
