"""The API process's one ``done`` listener (server/api/tasks/fanout.py): every consumer hears of
every job that ended, except a webhook consumer, which hears only of jobs whose end queued a
delivery (its outbox claim is a write; woken for every job it ran one beside each sync answer).
Consumers run on the event loop, and each message carries what the job's end wrote.
Once ``start()`` returned, nothing that ends is missed, even before the listener's first wait (a
PostgreSQL listener used to LISTEN only then; a local one could bind its socket after the first
job ended)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.scale import template_job
from server.api.tasks.fanout import DoneFanout
from server.jobs.contract import Done
from server.jobs.store import JobStore, new_id
from server.settings import Settings
from tests.support import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            store = JobStore.at(f"sqlite:///{tmp_path / 'jobs.db'}", run_dir=tmp_path / "run")
        else:
            url = stack.enter_context(fresh_database())
            store = JobStore.at(Settings(database_url=url).resolved_database_url)
        stack.callback(store.close)
        store.migrate()
        yield store


def test_webhook_consumers_hear_only_of_jobs_with_a_webhook(store: JobStore) -> None:
    plain = replace(template_job("k"), id=new_id())
    hooked = replace(template_job("k"), id=new_id(), webhook_url="http://127.0.0.1:9/hook")
    failed = replace(template_job("k"), id=new_id(), webhook_url="http://127.0.0.1:9/hook")
    heard: list[Done] = []
    webhooks: list[str] = []
    threads: set[str] = set()

    def consumer(dones: list[Done]) -> None:
        heard.extend(dones)
        threads.add(threading.current_thread().name)

    async def scenario() -> None:
        fanout = DoneFanout(store.notifier)
        fanout.subscribe(consumer)
        fanout.subscribe(lambda dones: webhooks.extend(d.job_id for d in dones), webhooks_only=True)
        for job in (plain, hooked, failed):
            store.create(job)
        await fanout.start()
        try:
            # The first end comes at once: no wait of the listener's has begun yet.
            assert store.cancel_queued(failed.id, "gone")  # ends queued: a failure, its webhook due
            for _ in range(2):  # the other two, run and completed
                claimed = store.claim("w", [plain.variant], 60)
                assert claimed is not None and claimed.lease_token is not None
                assert store.complete(claimed.id, claimed.lease_token, [], 1)
            for _ in range(200):  # each message is delivered within one wait of the listener
                if len(heard) == 3:
                    break
                await asyncio.sleep(0.05)
        finally:
            await fanout.stop()

    asyncio.run(scenario())
    assert sorted(d.job_id for d in heard) == sorted([plain.id, hooked.id, failed.id])
    assert sorted(webhooks) == sorted([hooked.id, failed.id])
    assert threads == {"MainThread"}  # on the event loop
    for done in heard:
        row = store.get(done.job_id)
        assert row is not None and done.ending is not None and done.ending.status == row.status


def listeners() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name == "done-listener"}


def test_a_lost_listen_connection_hands_over_to_a_thread_that_reconnects() -> None:
    """PostgreSQL: the event loop reads the LISTEN connection itself; when the database drops it, a
    thread takes over, reconnects and listens, and jobs that end are heard of again."""
    from sqlalchemy import text

    heard: list[str] = []
    with fresh_database() as url:
        store = JobStore.at(Settings(database_url=url).resolved_database_url)
        store.migrate()

        def end_one() -> str:
            job = replace(template_job("k"), id=new_id())
            store.create(job)
            assert store.cancel_queued(job.id, "gone")
            return job.id

        async def heard_of(job_id: str, seconds: float) -> bool:
            for _ in range(int(seconds / 0.05)):
                if job_id in heard:
                    return True
                await asyncio.sleep(0.05)
            return False

        async def scenario() -> None:
            fanout = DoneFanout(store.notifier)
            fanout.subscribe(lambda dones: heard.extend(d.job_id for d in dones))
            await fanout.start()
            try:
                assert await heard_of(end_one(), 10)
                assert listeners() == set()  # read by the loop: no thread
                with store.db.write() as conn:
                    killed = conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND query LIKE 'LISTEN qwen_edit_done%'"
                        )
                    ).all()
                assert killed == [(True,)]
                # News sent while no connection listens is lost (the slow polls cover it): end jobs
                # until one is heard of, through the thread's new connection.
                for _ in range(40):
                    if await heard_of(end_one(), 0.5):
                        break
                else:
                    raise AssertionError("no job heard of after the LISTEN connection was dropped")
                assert listeners() == {"done-listener"}
            finally:
                await fanout.stop()

        try:
            asyncio.run(scenario())
        finally:
            store.close()
