"""One listener on the ``done`` channel per API process, feeding every consumer of "a job ended"
(the sync-mode waiter, the webhook dispatcher): one thread, one LISTEN connection on PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from server.jobs.notify import Notifier, Subscription

Consumer = Callable[[list[str]], None]  # called on the event loop with the ids that ended


class DoneFanout:
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._consumers: list[Consumer] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sub: Subscription | None = None

    def subscribe(self, consumer: Consumer) -> None:
        self._consumers.append(consumer)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._listen, name="done-listener", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._sub is not None:
            self._sub.wake()
        if self._thread:
            await run_in_threadpool(self._thread.join, 5)

    def _listen(self) -> None:
        sub = self._sub = self.notifier.subscribe("done")
        try:
            while not self._stop.is_set():
                ids = sub.wait(0.5)
                if ids and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._deliver, ids)
        finally:
            sub.close()

    def _deliver(self, ids: list[str]) -> None:
        for consumer in self._consumers:
            consumer(ids)
