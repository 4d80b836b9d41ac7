"""Waiting, in the API process, for jobs to end (sync mode), without one query per waiter per tick.

The ``done`` fan-out wakes the waiters named in each notification; one slow poll covers
notifications that never came (another machine, a restart), checking all waiting ids in one query.
A wait starts without a query of its own: the jobs waited for were created by this process a moment
before, and one that ended since was heard of (the ids heard lately are remembered) or is found by
the next slow poll.

A ``done`` message carries what the job's end wrote (``Ending``): applied to the job as the request
created it, that is the finished row, so a sync answer needs no read of the store after the news.
Only news without one (a message too big for it, an older worker, the slow poll) costs that read.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import structlog
from starlette.concurrency import run_in_threadpool

from server.api.tasks.base import Background
from server.errors import StoreUnavailable
from server.jobs.contract import Done, Ending, Job
from server.jobs.store import JobStore

log = structlog.get_logger(__name__)

REMEMBERED = 10_000  # ids of jobs heard to have ended, kept for a wait that starts after the news


class CompletionWaiter(Background):
    def __init__(self, store: JobStore, poll_s: float = 1.0) -> None:
        super().__init__()
        self.store = store
        self.poll_s = poll_s
        # Each waiting request's future: what the job's end wrote, when the news carried it, else None.
        self._waiters: dict[str, list[asyncio.Future[Ending | None]]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    def heard(self, dones: list[Done]) -> None:
        """A fan-out consumer (on the event loop): these jobs ended."""
        self.wake([done.job_id for done in dones], {done.job_id: done.ending for done in dones if done.ending})

    def wake(self, ids: list[str], endings: dict[str, Ending] | None = None) -> None:
        """On the event loop: these jobs ended (``endings``: what their ends wrote, where known)."""
        for job_id in ids:
            self._ended[job_id] = None
            if len(self._ended) > REMEMBERED:
                self._ended.popitem(last=False)
            for fut in self._waiters.pop(job_id, []):
                if not fut.done():
                    fut.set_result((endings or {}).get(job_id))

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

    async def _wait(self, job_id: str, timeout: float) -> tuple[bool, Ending | None]:
        """Whether the job ended in time, and what its end wrote when that came with the news."""
        if job_id in self._ended:
            return True, None
        fut: asyncio.Future[Ending | None] = asyncio.get_running_loop().create_future()
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

    async def outcome(self, job: Job, timeout: float) -> Job:
        """``job`` (as this process created it) once it ended, or as it stands when ``timeout`` ran
        out (sync mode)."""
        _, ending = await self._wait(job.id, timeout)
        if ending is not None:
            return job.ended(ending)
        # Timed out, ended before the wait, or heard of without its ending: the row says.
        current = await run_in_threadpool(self.store.get, job.id)
        assert current is not None  # an accepted job is never deleted before it ends
        return current
