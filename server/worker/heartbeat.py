"""The worker's heartbeat thread: it renews the lease of each job in hand (publishing its progress
and noticing a cancel or a lost lease), and keeps the worker's own row fresh in the registry, with
its GPU memory, so that readiness counts only workers that are alive.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import structlog

from server.errors import StoreUnavailable
from server.jobs.contract import PRESENCE_EVERY_S, WorkerInfo, WorkerState
from server.jobs.store import JobStore, now_ms
from server.worker.gpu import cuda_memory
from server.worker.runs import Run, RunBoard, RunState

log = structlog.get_logger(__name__)


class Presence:
    """What this worker says of itself: its id, variant and state."""

    def __init__(self, store: JobStore, worker_id: str, variant: str) -> None:
        self.store = store
        self.worker_id = worker_id
        self.variant = variant
        self.state = WorkerState.LOADING
        self.detail = ""
        self.started_at = now_ms()

    def set(self, state: WorkerState, detail: str = "") -> None:
        self.state, self.detail = state, detail
        self.publish()

    def publish(self) -> None:
        info = WorkerInfo(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            variant=self.variant,
            state=self.state,
            detail=self.detail,
            started_at=self.started_at,
            heartbeat_at=now_ms(),
        )
        try:
            self.store.workers.record(info)
            gpu = cuda_memory(info.heartbeat_at)
            if gpu is not None:
                self.store.workers.publish_gpu_memory(self.worker_id, gpu)
        except StoreUnavailable as exc:
            log.warning("could not record worker state", error=str(exc))


class Heartbeat:
    def __init__(self, store: JobStore, board: RunBoard, presence: Presence, lease_s: float) -> None:
        self.store = store
        self.board = board
        self.presence = presence
        self.lease_s = lease_s
        self.interval_s = min(0.5, lease_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _loop(self) -> None:
        last_presence = 0.0
        while not self._stop.wait(self.interval_s):
            try:
                for run in self.board.unsettled():
                    self._beat(run)
                if time.monotonic() - last_presence >= PRESENCE_EVERY_S:
                    last_presence = time.monotonic()
                    self.presence.publish()
            except Exception:  # never let one bad beat end the thread: every lease in hand depends on it
                log.exception("heartbeat failed")

    def _beat(self, run: Run) -> None:
        try:
            beat = self.store.heartbeat(run.job.id, run.token, self.lease_s, run.step, run.total)
        except StoreUnavailable as exc:
            log.warning("heartbeat failed", prediction_id=run.job.id, error=str(exc))
            return
        if not beat.alive:
            run.stop(RunState.LEASE_LOST)
        elif beat.cancel_requested:
            run.stop(RunState.CANCEL_REQUESTED)
