"""One listener on the ``done`` channel per API process, feeding every consumer of "a job ended"
(the sync-mode waiter, the webhook dispatcher): one thread, one LISTEN connection on PostgreSQL.
A webhook consumer hears only of the jobs whose end queued a delivery: its outbox claim is a write,
and waking it for every job would put that write beside each sync answer's read."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import structlog
from starlette.concurrency import run_in_threadpool

from server.jobs.notify import Notifier, Subscription, parse_done

log = structlog.get_logger(__name__)

Consumer = Callable[[list[str]], None]  # called with the ids that ended


class DoneFanout:
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._consumers: list[tuple[Consumer, bool]] = []  # (consumer, webhooks only), on the event loop
        self._on_thread: list[Consumer] = []  # on the listener thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sub: Subscription | None = None

    def subscribe(self, consumer: Consumer, *, webhooks_only: bool = False, on_thread: bool = False) -> None:
        """``on_thread``: called on the listener thread, not the event loop (a consumer that does
        blocking work, such as reading rows, before it needs the loop: one hop instead of three)."""
        if on_thread:
            assert not webhooks_only, "an on-thread consumer hears of every job"
            self._on_thread.append(consumer)
        else:
            self._consumers.append((consumer, webhooks_only))

    async def start(self) -> None:
        """Returns once listening: a job that ends after this is heard of (its end can come before
        the thread's first wait; a message sent to nobody is lost)."""
        self._loop = asyncio.get_running_loop()
        self._sub = await run_in_threadpool(self.notifier.subscribe, "done")
        self._thread = threading.Thread(target=self._listen, name="done-listener", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._sub is not None:
            self._sub.wake()
        if self._thread:
            await run_in_threadpool(self._thread.join, 5)

    def _listen(self) -> None:
        sub = self._sub
        assert sub is not None  # made by start()
        try:
            while not self._stop.is_set():
                ended = [parse_done(payload) for payload in sub.wait(0.5) if payload]  # "": a wake()
                if not ended:
                    continue
                for consumer in self._on_thread:
                    try:
                        consumer([job_id for job_id, _ in ended])
                    except Exception:  # the others, and the next messages, are still delivered
                        log.exception("done consumer failed", consumer=repr(consumer))
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._deliver, ended)
        finally:
            sub.close()

    def _deliver(self, ended: list[tuple[str, bool]]) -> None:
        for consumer, webhooks_only in self._consumers:
            ids = [job_id for job_id, webhook in ended if webhook or not webhooks_only]
            if ids:
                consumer(ids)
