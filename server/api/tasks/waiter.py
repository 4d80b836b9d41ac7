"""Waiting, in the API process, for jobs to end (sync mode), without one query per waiter per tick.

The ``done`` fan-out wakes the waiters named in each notification; one slow poll covers
notifications that never came (another machine, a restart), checking all waiting ids in one query.
A wait starts without a query of its own: the jobs waited for were created by this process a moment
before, and one that ended since was heard of (the ids heard lately are remembered) or is found by
the next slow poll. On a sync request that saves a trip to a thread and the database.

The finished row of a job someone waits for is read on the listener's thread, as the news arrives
(``heard``), and handed to the waiting request with it: the request goes from the event loop to a
pool thread and back once less, on the path every sync answer takes.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import structlog
from starlette.concurrency import run_in_threadpool

from server.api.tasks.base import Background
from server.errors import StoreUnavailable
from server.jobs.contract import Job
from server.jobs.store import JobStore

log = structlog.get_logger(__name__)

REMEMBERED = 10_000  # ids of jobs heard to have ended, kept for a wait that starts after the news


class CompletionWaiter(Background):
    def __init__(self, store: JobStore, poll_s: float = 1.0) -> None:
        super().__init__()
        self.store = store
        self.poll_s = poll_s
        # Each waiting request's future: the finished row when it was read with the news, else None.
        self._waiters: dict[str, list[asyncio.Future[Job | None]]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        super().start()

    def heard(self, ids: list[str]) -> None:
        """A fan-out consumer on the listener's thread: read the rows of the jobs waited for, then
        wake their waiters on the loop with them. (``in`` on the dict the loop changes is safe under
        the GIL; a waiter that comes or goes meanwhile costs a read, never a wrong answer.)"""
        wanted = [job_id for job_id in ids if job_id in self._waiters]
        rows: dict[str, Job] = {}
        try:
            rows = {job.id: job for job in map(self.store.get, wanted) if job is not None}
        except StoreUnavailable as exc:  # each waiter reads its row itself
            log.warning("reading finished jobs failed", error=str(exc))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.wake, ids, rows)

    def wake(self, ids: list[str], rows: dict[str, Job] | None = None) -> None:
        """On the event loop: these jobs ended (``rows``: the finished rows read with the news)."""
        for job_id in ids:
            self._ended[job_id] = None
            if len(self._ended) > REMEMBERED:
                self._ended.popitem(last=False)
            for fut in self._waiters.pop(job_id, []):
                if not fut.done():
                    fut.set_result((rows or {}).get(job_id))

    async def run(self) -> None:
        """The slow poll, for the notifications that never came."""
        while True:
            await asyncio.sleep(self.poll_s)
            if not self._waiters:
                continue
            try:
                done = await run_in_threadpool(self.store.terminal_among, list(self._waiters))
            except StoreUnavailable as exc:  # keep waiting: the sync timeout bounds it
                log.warning("completion poll failed", error=str(exc))
                continue
            self.wake(done)

    async def wait(self, job_id: str, timeout: float) -> bool:
        """True when the job ended within ``timeout`` seconds (it may have ended before the call)."""
        ended, _ = await self._wait(job_id, timeout)
        return ended

    async def _wait(self, job_id: str, timeout: float) -> tuple[bool, Job | None]:
        """Whether the job ended in time, and its finished row when it came with the news."""
        if job_id in self._ended:
            return True, None
        fut: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)
        try:
            return True, await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False, None
        finally:
            futures = self._waiters.get(job_id)
            if futures and fut in futures:
                futures.remove(fut)
                if not futures:
                    self._waiters.pop(job_id, None)

    async def outcome(self, job_id: str, timeout: float) -> Job:
        """The job once it ended, or as it stands when ``timeout`` ran out (sync mode)."""
        _, current = await self._wait(job_id, timeout)
        if current is None:  # timed out, ended before the wait, or heard of by the slow poll
            current = await run_in_threadpool(self.store.get, job_id)
        assert current is not None  # an accepted job is never deleted before it ends
        return current
