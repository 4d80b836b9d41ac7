"""One listener on the ``done`` channel per API process, feeding every consumer of "a job ended"
(the sync-mode waiter, the webhook dispatcher) on the event loop: the loop reads the local socket
or PostgreSQL's LISTEN connection itself. Where there is nothing to read yet (the database was down
at start-up) or the connection is lost, a thread waits instead, and reconnects. A webhook consumer
hears only of the jobs whose end queued a delivery: its outbox claim is a write, and waking it for
every job would put that write beside each sync answer."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

import structlog
from starlette.concurrency import run_in_threadpool

from server.jobs.contract import Done
from server.jobs.notify import Notifier, Readable, Subscription

log = structlog.get_logger(__name__)

Consumer = Callable[[list[Done]], None]  # called on the event loop with the jobs that ended


class DoneFanout:
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._consumers: list[tuple[Consumer, bool]] = []  # (consumer, webhooks only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sub: Subscription | None = None
        self._fd: int | None = None  # what the event loop watches, while it reads the channel itself

    def subscribe(self, consumer: Consumer, *, webhooks_only: bool = False) -> None:
        self._consumers.append((consumer, webhooks_only))

    async def start(self) -> None:
        """Returns once listening: a job that ends after this is heard of (its end can come before
        the thread's first wait; a message sent to nobody is lost). The local socket (the embedded
        default) or the LISTEN connection is read by the event loop itself: a thread between it and
        the loop was one more wake-up on the path of every sync answer."""
        self._loop = asyncio.get_running_loop()
        self._sub = await run_in_threadpool(self.notifier.subscribe, "done")
        if isinstance(self._sub, Readable):
            with contextlib.suppress(OSError):  # nothing to watch: the thread waits and reconnects
                fd = self._sub.fileno()
                self._loop.add_reader(fd, self._readable, self._sub)
                self._fd = fd
                return
        self._listen_on_thread()

    def _listen_on_thread(self) -> None:
        self._thread = threading.Thread(target=self._listen, name="done-listener", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._sub is None:
            return
        if self._fd is not None:  # read by the loop
            assert self._loop is not None
            self._loop.remove_reader(self._fd)
            self._fd = None
        if self._thread is None:
            self._sub.close()
            return
        self._sub.wake()
        await run_in_threadpool(self._thread.join, 5)

    def _readable(self, sub: Readable) -> None:
        try:
            payloads = sub.drain()
        except Exception as exc:  # the connection is lost: a thread waits, reconnecting, from now on
            log.warning("done listener connection lost; listening on a thread", error=str(exc))
            assert self._loop is not None and self._fd is not None
            self._loop.remove_reader(self._fd)
            self._fd = None
            self._listen_on_thread()
            return
        ended = _parsed(payloads)
        if ended:
            self._deliver(ended)

    def _listen(self) -> None:
        sub = self._sub
        assert sub is not None  # made by start()
        try:
            while not self._stop.is_set():
                ended = _parsed(sub.wait(0.5))
                if ended and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._deliver, ended)
        finally:
            sub.close()

    def _deliver(self, ended: list[Done]) -> None:
        for consumer, webhooks_only in self._consumers:
            dones = [done for done in ended if done.webhook or not webhooks_only]
            if not dones:
                continue
            try:
                consumer(dones)
            except Exception:  # the others, and the next messages, are still delivered
                log.exception("done consumer failed", consumer=repr(consumer))


def _parsed(payloads: list[str]) -> list[Done]:
    """The ``done`` messages among ``payloads`` ("" is a bare wake-up, not one)."""
    return [done for done in map(Done.parse, payloads) if done is not None]
