"""The worker's wake-ups, and the jobs handed to it with them.

On PostgreSQL a submit that picks an idle worker inserts the job already leased to it and sends it
the job (``contract.Handoff``): the worker starts it without a claim. Whichever wait returns it (the
claim loop's, the prefetch thread's, the batch wait's), the handoff is kept here until the worker
takes it at its next claim. A worker that cannot start it now (busy with a job that came first, or
stopping) releases it to the queue unspent, where any worker, this one too, claims it as usual.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import replace

import structlog

from server.jobs.contract import Handoff, Job
from server.jobs.notify import Subscription

log = structlog.get_logger(__name__)


class Inbox:
    """A ``Subscription`` of the ``jobs`` channel that keeps the handoffs among its payloads."""

    def __init__(self, sub: Subscription, owner: str) -> None:
        self.sub = sub
        self.owner = owner
        self._handed: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()  # waits and takes happen on different threads

    def wait(self, timeout: float, *, ready: bool = True) -> list[str]:
        """``Subscription.wait``: the payloads that are not handoffs, and the job's variant for each
        handoff (a job of it came), so that callers that look for one find it."""
        payloads: list[str] = []
        for payload in self.sub.wait(timeout, ready=ready):
            try:
                handoff = Handoff.parse(payload)
            except ValueError as exc:  # its lease runs out and the reaper queues the job again
                log.error("a handed job that cannot be read", error=str(exc))
                continue
            if handoff is None:
                payloads.append(payload)
                continue
            with self._lock:
                self._handed.append(replace(handoff.job, lease_owner=self.owner))
            payloads.append(handoff.job.variant)
        return payloads

    def take(self) -> Job | None:
        """The oldest job handed to this worker and not yet taken (leased to it, its attempt spent)."""
        with self._lock:
            return self._handed.popleft() if self._handed else None

    def take_all(self) -> list[Job]:
        with self._lock:
            handed, self._handed = list(self._handed), collections.deque()
        return handed

    def wake(self) -> None:
        self.sub.wake()

    def close(self) -> None:
        self.sub.close()
