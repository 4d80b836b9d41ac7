"""The worker's claim loop: lease the next job (and, with dynamic batching, compatible ones), hand
them to the executor, repeat until told to stop; expired leases are reaped on the way.

A stop request drains: no new claims, the job in hand finishes for up to ``worker_drain_s``, then
it is handed back to the queue. A second request hands it back at once.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from pipelines.registry import Variant
from server.errors import StoreUnavailable
from server.jobs.contract import Job, WorkerState
from server.jobs.notify import Subscription
from server.jobs.store import JobStore
from server.settings import Settings
from server.storage.base import Storage
from server.worker.execute import Executor, OutputStep, Runner
from server.worker.heartbeat import Heartbeat, Presence
from server.worker.inbox import Inbox
from server.worker.overlap import Overlap
from server.worker.runs import RunBoard, RunState
from server.worker.safety import SafetyChecker
from server.worker.supervisor import DRAIN_SIGNAL, HANDBACK_SIGNAL

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Worker:
    def __init__(
        self, settings: Settings, store: JobStore, storage: Storage, variant: Variant, worker_id: str | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.variant = variant
        self.id = worker_id or settings.worker_id or f"{socket.gethostname()}/0"
        self.board = RunBoard()
        self.presence = Presence(store, self.id, variant.name)
        self.heartbeat = Heartbeat(store, self.board, self.presence, settings.lease_s)
        self.stopping = threading.Event()  # no new claims; the job in hand may finish
        # Stop requests by signal, counted by one C call: a second signal's handler can run inside
        # the first's (Python runs handlers between bytecodes), so an Event checked and then set
        # could take both for the first and lose the hand-back the second one asked for.
        self._stop_requests = itertools.count()
        self.abandon = threading.Event()  # hand the job in hand back now, stop waiting on the store
        self._sub: Inbox | None = None  # the claim loop's wake-ups, with the jobs handed to this worker
        # Post-processing of each job's output images before they are stored (a safety checker...).
        self.output_steps: list[OutputStep] = []
        self._last_reap = 0.0
        self._parent = os.getppid()

    # --- stopping ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT: drain; a second one: hand back now. The supervisor's DRAIN_SIGNAL drains
        (however often it comes, and beside a SIGTERM of systemd's); its HANDBACK_SIGNAL hands back."""

        def on_stop(signum: int, _frame: Any) -> None:
            if next(self._stop_requests) > 0 or self.stopping.is_set():  # asked twice: hand back now
                self.hand_back()
            else:
                self.drain(signal.Signals(signum).name)

        def on_drain(signum: int, _frame: Any) -> None:
            if not self.stopping.is_set():
                self.drain(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(DRAIN_SIGNAL, on_drain)
        signal.signal(HANDBACK_SIGNAL, lambda _s, _f: self.hand_back())

    def drain(self, why: str = "asked to stop") -> None:
        """Stop claiming; finish the job in hand for up to the drain time, then hand it back."""
        if self.stopping.is_set():
            return
        self.stopping.set()  # before anything else: a request arriving meanwhile sees it
        runs = self.board.unsettled()
        log.info(
            "worker stopping",
            reason=why,
            finishing=[f"{run.job.id} (step {run.step}/{run.total})" for run in runs] or "nothing",
            drain_s=self.settings.worker_drain_s if runs else 0,
            hint="a second SIGTERM hands the job back to the queue now" if runs else "",
        )
        if self._sub is not None:
            self._sub.wake()  # an idle claim loop ends now, not at its next poll
        timer = threading.Timer(self.settings.worker_drain_s, self.hand_back)
        timer.daemon = True
        timer.start()

    def hand_back(self) -> None:
        """Stop the jobs in hand at their next step and return them to the queue (no attempt spent)."""
        if self.board.unsettled() and not self.abandon.is_set():
            log.warning("worker stopping now: the job in hand goes back to the queue")
        self.stopping.set()
        self.abandon.set()
        self.board.stop_all(RunState.HANDING_BACK)

    # --- serving -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat (the registry sees this worker from now on, loading)."""
        self.presence.set(WorkerState.LOADING)
        self.heartbeat.start()

    def serve(self, runner: Runner, safety: SafetyChecker | None = None) -> None:
        """Run jobs until told to stop (``safety``: the checker every output goes through)."""
        executor = Executor(
            self.settings, self.store, self.storage, runner, self.board, self.abandon, safety, self.output_steps
        )
        released = self._retrying(lambda: self.store.release_owned_by(self.id))
        if released:
            log.warning("requeued jobs left running by this worker's previous life", count=released)
        self.presence.set(WorkerState.READY)
        sub = self._sub = Inbox(self.store.notifier.subscribe("jobs", self.variant.name, owner=self.id), self.id)
        try:
            if self.settings.worker_overlap:
                Overlap(self, executor, sub).run()
            else:
                self._serial(executor, sub)
        finally:
            sub.wait(0, ready=False)  # a handoff already sent, not yet read
            self.release_handed(sub.take_all())
            sub.close()
            self.stopping.set()
            self.heartbeat.stop()
            self.presence.set(WorkerState.STOPPED)

    def _serial(self, executor: Executor, sub: Subscription) -> None:
        """One job at a time: claim, load, run, store, settle."""
        woken: list[str] = []
        while self.housekeeping():
            job = self.claim_next(spend_attempt=True, woken=woken)
            woken = []
            if job is None:
                woken = sub.wait(self.settings.poll_interval_s)
                continue
            executor.run([job, *self.compatible(job, sub)])
            self.check_runner(executor)

    def check_runner(self, executor: Executor) -> None:
        """A worker group out of step after a failed run (server/worker/group.py) stops this worker,
        so that the whole group restarts; a job claimed ahead goes back unspent."""
        broken = getattr(executor.runner, "broken", None)
        if broken:
            log.error("worker group out of step after a failed run: restarting it", error=broken)
            self.stopping.set()

    def housekeeping(self) -> bool:
        """Reap expired leases now and then; False once the worker must stop (asked, or orphaned)."""
        if time.monotonic() - self._last_reap > max(1.0, self.settings.lease_s / 4):
            self._last_reap = time.monotonic()
            self._safely(self.store.reap)
        if os.getppid() != self._parent and self._parent != 1:
            log.warning("parent process died: stopping")
            self.stopping.set()
        return not self.stopping.is_set()

    def claim_next(self, *, spend_attempt: bool, woken: list[str] | None = None) -> Job | None:
        """The next job: one handed to this worker (already leased to it, its attempt spent), else
        one claimed. ``spend_attempt=False``: claimed ahead, while the pipeline is busy: a job
        handed meanwhile cannot start now (its message came even after the wait it was meant for
        stopped waiting for it: notify.OWED_MESSAGE_S), so it goes back to the queue unspent, and is
        claimed like any other. ``woken``: what the
        wait before this claim returned (a job of this variant queued since the last claim: the
        store may skip its look before the write)."""
        if self._sub is not None:
            handed = self._sub.take()
            if handed is not None and spend_attempt:
                return handed
            self.release_handed([handed] if handed else [])
        hinted = woken is not None and self.variant.name in woken
        return self._safely(
            lambda: self.store.claim(
                self.id, [self.variant.name], self.settings.lease_s, spend_attempt=spend_attempt, woken=hinted
            )
        )

    def release_handed(self, handed: list[Job]) -> None:
        """Jobs handed to this worker that it will not start: back to the queue, their attempt refunded."""
        for job in handed:
            released = self._safely(functools.partial(self.store.release, job.id, job.lease_token or "", refund=True))
            log.info("handed job returned to the queue", prediction_id=job.id, released=bool(released))

    def compatible(self, job: Job, sub: Subscription, *, spend_attempt: bool = True) -> list[Job]:
        """Queued jobs that may share ``job``'s pipeline call, waiting up to ``batch_wait_ms`` for them."""
        size = self.settings.batch_max_size
        if size <= 1 or job.batch_key is None:
            return []
        key = job.batch_key
        more: list[Job] = []
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(more) < size - 1:
            got = self._safely(
                lambda: self.store.claim_compatible(
                    self.id, key, size - 1 - len(more), self.settings.lease_s, spend_attempt=spend_attempt
                )
            )
            more.extend(got or [])
            left = deadline - time.monotonic()
            if len(more) >= size - 1 or left <= 0 or self.stopping.is_set():
                break
            sub.wait(min(left, 0.05), ready=False)  # a new job of another batch: wake someone else
        return more

    def _safely(self, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None while the store is unavailable (after a pause: it may be restarting)."""
        try:
            return fn()
        except StoreUnavailable as exc:
            log.warning("job store unavailable", error=str(exc))
            self.stopping.wait(1.0)
            return None

    def _retrying(self, fn: Callable[[], T]) -> T | None:
        """``fn()``, retried with backoff while the store is unavailable (None if told to stop first)."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                return fn()
            except StoreUnavailable as exc:
                log.warning("job store unavailable; retrying", error=str(exc), retry_in_s=delay)
                self.stopping.wait(delay)
                delay = min(30.0, delay * 2)
        return None
