"""Worker overlap: the pipeline never waits on the store, the network or an encoder.

Three kinds of thread, one concern each:

    prefetch   claims the next job (or batch) once the pipeline is near free, fetches and decodes
               its inputs, and leaves it in a one-place hand-off; reaps expired leases meanwhile
    pipeline   the worker's own thread: takes the next loaded job, begins it, runs the pipeline,
               hands the images to the output threads and takes the next one at once
    outputs    run the output steps (a safety checker...), encode and store the images, settle the job;
               the pipeline thread does it itself when nothing waits for it and that is quick
               (measured): then the hand-off would cost the job more than it saves

A job claimed ahead spends its attempt only when it begins (``JobStore.begin``, written by the
prefetch thread once the job in the pipeline is in its last step, so that the pipeline thread never
waits on that write): one handed back when the worker stops, or left behind by a crash (its lease
expires and the reaper requeues it), was never charged a try. It sits on the run board from its
claim, so the heartbeat keeps its lease and notices a cancel meanwhile. "Near free" is measured,
not configured: the next job is claimed when the current one's remaining steps (at its measured
time per step) are within a few loads' time, so that a fleet's other idle workers are not kept
from a job that this one cannot start yet.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import structlog

from server.jobs.notify import Subscription
from server.worker.execute import Executor, Loaded
from server.worker.runs import Run

if TYPE_CHECKING:
    from server.worker.loop import Worker

log = structlog.get_logger(__name__)

# Claim ahead when the current job has at most this long left, plus twice the measured load time.
LEAD_S = 0.5
# Finish a run on the pipeline thread when no job is ahead and finishing takes at most this long (on
# average, measured): a job that comes meanwhile waits for the pipeline that long at most.
INLINE_FINISH_S = 0.02


class Average:
    """An exponential moving average (None until the first sample)."""

    def __init__(self, weight: float = 0.3) -> None:
        self.weight = weight
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)


class OutputThreads:
    """Finish runs (output steps, encode, store, settle) on a few threads of their own. At most
    ``2 x threads`` runs wait for them: past that the pipeline waits (memory stays bounded)."""

    def __init__(self, threads: int, errors: Callable[[Run], contextlib.AbstractContextManager[None]]) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="outputs")
        self._slots = threading.BoundedSemaphore(2 * threads)
        self._errors = errors

    def __call__(self, run: Run, store_result: Callable[[], None]) -> None:
        self._slots.acquire()
        try:
            self._pool.submit(self._work, run, store_result)
        except BaseException:
            self._slots.release()
            raise

    def _work(self, run: Run, store_result: Callable[[], None]) -> None:
        try:
            with self._errors(run):  # whatever happens, the job is settled (failed) and nothing escapes
                store_result()
        finally:
            self._slots.release()

    def close(self) -> None:
        """Wait for every output in hand to be stored and its job settled."""
        self._pool.shutdown(wait=True)


class Overlap:
    def __init__(self, worker: Worker, executor: Executor, sub: Subscription) -> None:
        self.worker = worker
        self.executor = executor
        self.sub = sub
        self.current: Loaded | None = None  # in the pipeline now
        self.ahead: Loaded | None = None  # claimed and loaded, waiting for the pipeline
        self.step_s = Average()  # pipeline seconds per step, whole call over its steps
        self.since = 0.0  # when the current job entered the pipeline (perf_counter)
        self.load_s = Average()  # claim + fetch + decode seconds
        self.finish_s = Average()  # output steps + encode + store + settle seconds, per run
        self.beginning = False  # the prefetch thread is beginning the job ahead: the pipeline waits for it
        self._cond = threading.Condition()  # guards current, ahead, beginning; notified when one changes
        self._woken: list[str] = []  # what the prefetch thread's last wait for jobs returned
        # PostgreSQL hands a job to an idle worker (server/worker/inbox.py), and only to one whose
        # wait said it is ready. A wait begun while the pipeline was busy is not: when the pipeline
        # frees with nothing ahead, that wait is ended so that the next one is ready.
        self._wake_when_free = worker.store.db.is_postgres
        self._busy_wait = False  # the prefetch thread waits, not ready (guarded by _cond)
        self._freed = False  # that wait was ended because the pipeline freed (guarded by _cond)
        self._outputs = OutputThreads(worker.settings.worker_output_threads, executor.job_errors)

    def run(self) -> None:
        """Serve until the worker stops; then hand back what was claimed ahead and store every output."""
        self.executor.finish = self._finish
        prefetch = threading.Thread(target=self._prefetch, name="prefetch", daemon=True)
        prefetch.start()
        try:
            while (loaded := self._take()) is not None:
                self._run(loaded)
        finally:
            self.worker.stopping.set()
            self.sub.wake()
            prefetch.join()
            self._return_ahead()
            self._outputs.close()
            self.executor.finish = self.executor.inline

    # --- the pipeline thread -------------------------------------------------------------

    def _take(self) -> Loaded | None:
        """The next loaded job, now current; None once the worker stops (what is ahead goes back)."""
        with self._cond:
            while (self.ahead is None or self.beginning) and not self.worker.stopping.is_set():
                self._cond.wait(0.1)
            if self.worker.stopping.is_set():
                return None
            self.current, self.ahead = self.ahead, None
            self._cond.notify_all()
            return self.current

    def _run(self, loaded: Loaded) -> None:
        try:
            loaded = self.executor.begin(loaded)
            self.since = time.perf_counter()
            self.executor.execute(loaded)
            steps = max((run.total for run, _ in loaded.inputs), default=0)
            if steps:
                self.step_s.add((time.perf_counter() - self.since) / steps)
        finally:
            self.worker.check_runner(self.executor)
            with self._cond:
                self.current = None
                freed = self._wake_when_free and self._busy_wait and self.ahead is None and not self._freed
                self._freed = self._freed or freed
                self._cond.notify_all()
            if freed:
                self.sub.wake()

    def _finish(self, run: Run, store_result: Callable[[], None]) -> None:
        """A finished run to the output threads, or, when no job is ahead and finishing is known to
        be quick, settled right here: on an idle worker that hand-off was a thread wake-up on the
        path of every answer (and the job's output then shared the cores with the pipeline thread's
        own bookkeeping)."""

        def timed() -> None:
            started = time.perf_counter()
            store_result()
            self.finish_s.add(time.perf_counter() - started)

        with self._cond:
            quick = self.finish_s.value is not None and self.finish_s.value <= INLINE_FINISH_S
            inline = quick and self.ahead is None and not self.beginning
        if inline:
            self.executor.inline(run, timed)
        else:
            self._outputs(run, timed)

    # --- the prefetch thread -------------------------------------------------------------

    def _prefetch(self) -> None:
        try:
            while self.worker.housekeeping():
                with self._cond:
                    if self._begin_due():
                        self.beginning = True
                    elif not self._near_free():
                        self._cond.wait(0.02)  # woken when the pipeline takes or ends a job
                        continue
                    idle = self.current is None
                if self.beginning:
                    self._begin_ahead()
                else:
                    self._claim_ahead(idle)
        except Exception:  # a bug here must not leave the pipeline waiting forever
            log.exception("prefetch failed: stopping the worker")
            self.worker.stopping.set()
        finally:
            self._return_ahead()

    def _claim_ahead(self, idle: bool) -> None:
        with self._cond:
            freed, self._freed = self._freed, False
        if idle and freed and not self._woken:
            # The wait was ended only because the pipeline freed: no job was queued since the
            # claim before it found none (its message would have ended the wait with a payload).
            # Wait ready at once, without a claim that would find nothing.
            self._wait(idle)
            return
        # Idle: the job starts at once, so its attempt is spent with the claim (no extra write).
        started = time.perf_counter()
        job = self.worker.claim_next(spend_attempt=idle, woken=self._woken if idle else None)
        self._woken = []
        if job is None:
            self._wait(idle)
            return
        batch = [job, *self.worker.compatible(job, self.sub, spend_attempt=idle)]
        loaded = self.executor.load(batch, begun=idle)
        self.load_s.add(time.perf_counter() - started)
        if loaded.inputs:  # else each failed on its inputs, and is settled
            with self._cond:
                self.ahead = loaded  # only this thread fills the place, and only when it is empty
                self._cond.notify_all()

    def _wait(self, idle: bool) -> None:
        """Wait for jobs. With the pipeline busy, not ready: a truly idle worker should take the
        next job first."""
        with self._cond:
            # The pipeline freed since the claim before this wait began: wait ready. (Checked under
            # the lock the pipeline thread ends a job with: either it sees this wait and ends it,
            # or this wait sees the pipeline free.)
            idle = idle or (self.current is None and self.ahead is None and not self.beginning)
            self._busy_wait = not idle
        try:
            self._woken = self.sub.wait(self.worker.settings.poll_interval_s, ready=idle)
        finally:
            with self._cond:
                self._busy_wait = False

    def _begin_ahead(self) -> None:
        """Spend the attempt of the job ahead (a store write) here, not on the pipeline thread."""
        assert self.ahead is not None
        try:
            self.ahead = self.executor.begin(self.ahead)
        finally:
            with self._cond:
                self.beginning = False
                self._cond.notify_all()

    def _begin_due(self) -> bool:
        """A job ahead not yet begun, and the pipeline in the last step of its job: the job ahead
        starts within a step, so its attempt counts from now."""
        ahead = self.ahead
        if ahead is None or all(run.begun or run.settled for run in ahead.runs):
            return False
        if self.current is None:
            return False  # the pipeline takes it now and begins it itself
        runs = [run for run, _ in self.current.inputs if not run.settled]
        return bool(runs) and max(run.total - run.step for run in runs) <= 1

    def _near_free(self) -> bool:
        """Room ahead, and the pipeline idle or within a few loads' time of the end of its job."""
        if self.ahead is not None:
            return False
        if self.current is None:
            return True
        runs = [run for run, _ in self.current.inputs if not run.settled]
        done = max((run.step for run in runs), default=0)
        left = max((run.total - run.step for run in runs), default=0)
        # Seconds a step: this job's own so far, else the last jobs'. Unknown (the first job, before
        # its first step): wait for that step rather than claim blind, so that a long first job does
        # not hold the next one here while another worker could start it now.
        step_s = (time.perf_counter() - self.since) / done if done else self.step_s.value
        if step_s is None:
            return False
        return left * step_s <= LEAD_S + 2 * (self.load_s.value or 0.0)

    # --- stopping ------------------------------------------------------------------------

    def _return_ahead(self) -> None:
        """Return a job claimed ahead that will not run here to the queue (no attempt spent)."""
        with self._cond:
            loaded, self.ahead = self.ahead, None
        for run in loaded.runs if loaded else []:
            if not run.settled:
                self.executor.hand_back(run)
