"""The sync-mode waiter (server/api/tasks/waiter.py): a wait starts without a query of its own; news
of a job's end that came before its wait is remembered; news that never came is made up for by the
slow poll, which asks the store about every waiting id in one query. News that carries what the
job's end wrote answers the wait without a read; news without it costs one."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

from benchmarks.jobs import store_job
from server.api.tasks.waiter import REMEMBERED, CompletionWaiter
from server.jobs.contract import Done, Ending, Status


class Store:
    """The store's side the waiter uses: which of some ids ended; every question is recorded."""

    def __init__(self) -> None:
        self.ended: set[str] = set()
        self.asked: list[list[str]] = []

        self.reads: list[tuple[str, str]] = []  # (job id, thread name)

    def terminal_among(self, ids: list[str]) -> list[str]:
        self.asked.append(sorted(ids))
        return [i for i in ids if i in self.ended]

    def get(self, job_id: str) -> Any:
        self.reads.append((job_id, threading.current_thread().name))
        return SimpleNamespace(id=job_id, read_on=threading.current_thread().name)


def waiter(store: Store, poll_s: float = 3600) -> CompletionWaiter:
    return CompletionWaiter(store, poll_s=poll_s)  # type: ignore[arg-type]


def test_news_before_the_wait_ends_it_at_once_without_a_query() -> None:
    store = Store()
    w = waiter(store)

    async def scenario() -> bool:
        w.wake(["a"])  # the job ended between its submit and the wait
        return await w.wait("a", timeout=5)

    assert asyncio.run(scenario()) is True
    assert store.asked == []


def test_news_during_the_wait_ends_it_and_none_means_a_timeout() -> None:
    store = Store()
    w = waiter(store)

    async def scenario() -> tuple[bool, bool]:
        waiting = asyncio.ensure_future(w.wait("b", timeout=30))
        await asyncio.sleep(0)
        w.wake(["b"])
        return await waiting, await w.wait("never", timeout=0.05)

    assert asyncio.run(scenario()) == (True, False)
    assert store.asked == []


def test_the_slow_poll_finds_what_no_news_told() -> None:
    store = Store()
    w = waiter(store, poll_s=0.01)
    store.ended.add("c")  # ended on a machine whose notification never came

    async def scenario() -> Any:
        poll = asyncio.ensure_future(w.run())
        try:
            return await w.wait("c", timeout=30)
        finally:
            poll.cancel()

    assert asyncio.run(scenario()) is True
    assert ["c"] in store.asked


def test_what_it_remembers_is_bounded() -> None:
    w = waiter(Store())
    w.wake([f"job{i}" for i in range(REMEMBERED + 10)])
    assert len(w._ended) == REMEMBERED and "job0" not in w._ended


def test_news_with_the_ending_answers_without_a_read_and_news_without_it_reads_once() -> None:
    store = Store()
    w = waiter(store)
    job = store_job(id="d")
    end = Ending(
        status=Status.COMPLETED,
        outputs=["outputs/d/0.png"],
        error="",
        error_code=None,
        inference_ms=42,
        nsfw=None,
        attempts=1,
        progress_step=2,
        progress_total=2,
        started_at=job.created_at + 1,
        finished_at=job.created_at + 50,
        updated_at=job.created_at + 50,
        lease_token=None,
        lease_owner="w",
        lease_expires_at=None,
        cancel_requested=False,
    )

    async def scenario() -> tuple[Any, Any]:
        waiting = asyncio.ensure_future(w.outcome(job, timeout=30))
        await asyncio.sleep(0)
        w.heard([Done("d", ending=end), Done("e")])  # "e": nobody waits for it
        told = await waiting
        # An older worker's news (no ending): the row is read, once.
        other = asyncio.ensure_future(w.outcome(store_job(id="f"), timeout=30))
        await asyncio.sleep(0)
        w.heard([Done("f")])
        return told, await other

    told, read = asyncio.run(scenario())
    assert told == job.ended(end) and told.status == Status.COMPLETED and told.outputs == ["outputs/d/0.png"]
    assert read.id == "f" and [job_id for job_id, _ in store.reads] == ["f"]
