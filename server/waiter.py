"""Waiting, in the API process, for jobs to end (sync mode), without one query per waiter per tick.

One thread listens on the ``done`` channel and wakes the waiters named in it; one slow poll covers
notifications that never came (another machine, a restart), checking all waiting ids in one query.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import structlog
from starlette.concurrency import run_in_threadpool

from server.jobs.store import JobStore

log = structlog.get_logger(__name__)


class CompletionWaiter:
    def __init__(self, store: JobStore, poll_s: float = 1.0) -> None:
        self.store = store
        self.poll_s = poll_s
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._listen, name="done-listener", daemon=True)
        self._thread.start()
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        self._stop.set()
        if self._poller:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._thread:
            await run_in_threadpool(self._thread.join, 5)

    def _listen(self) -> None:
        sub = self.store.notifier.subscribe("done")
        try:
            while not self._stop.is_set():
                ids = sub.wait(0.5)
                if ids and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._wake, ids)
        finally:
            sub.close()

    def _wake(self, ids: list[str]) -> None:
        for job_id in ids:
            for fut in self._waiters.pop(job_id, []):
                if not fut.done():
                    fut.set_result(None)

    async def _poll(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.poll_s)
            if not self._waiters:
                continue
            try:
                done = await run_in_threadpool(self.store.terminal_among, list(self._waiters))
            except Exception as exc:  # database away: keep waiting, the sync timeout bounds it
                log.warning("completion poll failed", error=str(exc))
                continue
            self._wake(done)

    async def wait(self, job_id: str, timeout: float) -> bool:
        """True when the job ended within ``timeout`` seconds (it may have ended before the call)."""
        if job_id in await run_in_threadpool(self.store.terminal_among, [job_id]):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            futures = self._waiters.get(job_id)
            if futures and fut in futures:
                futures.remove(fut)
                if not futures:
                    self._waiters.pop(job_id, None)
