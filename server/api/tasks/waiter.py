"""Waiting, in the API process, for jobs to end (sync mode), without one query per waiter per tick.

The ``done`` fan-out wakes the waiters named in each notification; one slow poll covers
notifications that never came (another machine, a restart), checking all waiting ids in one query.
A wait starts without a query of its own: the jobs waited for were created by this process a moment
before, and one that ended since was heard of (the ids heard lately are remembered) or is found by
the next slow poll. On a sync request that saves a trip to a thread and the database.
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
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    def wake(self, ids: list[str]) -> None:
        """A fan-out consumer (on the event loop): these jobs ended."""
        for job_id in ids:
            self._ended[job_id] = None
            if len(self._ended) > REMEMBERED:
                self._ended.popitem(last=False)
            for fut in self._waiters.pop(job_id, []):
                if not fut.done():
                    fut.set_result(None)

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
        if job_id in self._ended:
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

    async def outcome(self, job_id: str, timeout: float) -> Job:
        """The job once it ended, or as it stands when ``timeout`` ran out (sync mode)."""
        await self.wait(job_id, timeout)
        current = await run_in_threadpool(self.store.get, job_id)
        assert current is not None  # an accepted job is never deleted before it ends
        return current
