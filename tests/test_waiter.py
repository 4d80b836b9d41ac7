"""The sync-mode waiter (server/api/tasks/waiter.py): a wait starts without a query of its own; news
of a job's end that came before its wait is remembered; news that never came is made up for by the
slow poll, which asks the store about every waiting id in one query. The finished row of a job
someone waits for is read on the listener's thread with the news, and no second time."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

from server.api.tasks.waiter import REMEMBERED, CompletionWaiter


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


def test_the_row_is_read_once_on_the_listener_thread_and_handed_over() -> None:
    store = Store()
    w = waiter(store)

    async def scenario() -> Any:
        w.start()
        try:
            waiting = asyncio.ensure_future(w.outcome("d", timeout=30))
            await asyncio.sleep(0)
            # The listener thread hears of "d" (waited for) and "e" (nobody waits: no read).
            listener = threading.Thread(target=w.heard, args=(["d", "e"],), name="done-listener")
            listener.start()
            row = await waiting
            listener.join()
            return row, await w.wait("e", timeout=0.05)  # remembered: no wait, no read
        finally:
            await w.stop()

    row, e_ended = asyncio.run(scenario())
    assert row.id == "d" and row.read_on == "done-listener"
    assert store.reads == [("d", "done-listener")] and e_ended is True
