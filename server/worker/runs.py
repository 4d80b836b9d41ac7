"""The jobs a worker is running, each with one named state.

Three threads touch a run: the pipeline thread (steps, settling), the heartbeat (the client
cancelled; the lease was lost) and the stop handler (hand it back). Each says what it wants as a
state change; a stronger reason to stop overrides a weaker one, and a settled run never changes:

    ACTIVE --> HANDING_BACK --> CANCEL_REQUESTED --> LEASE_LOST      (stop reasons, weakest first)
       \\____________\\__________________\\________________\\--> SETTLED
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

from server.jobs.contract import Job


class RunState(enum.Enum):
    ACTIVE = "active"  # claimed: loading its inputs or in the pipeline
    HANDING_BACK = "handing back"  # the worker is stopping and its drain ran out: release the job
    CANCEL_REQUESTED = "cancel requested"  # the client cancelled it: fail it as cancelled
    LEASE_LOST = "lease lost"  # reaped, or finished elsewhere: stop, write nothing
    SETTLED = "settled"  # completed, failed, released or abandoned: nothing more to write


_STOP_STRENGTH = {RunState.ACTIVE: 0, RunState.HANDING_BACK: 1, RunState.CANCEL_REQUESTED: 2, RunState.LEASE_LOST: 3}


@dataclass
class Run:
    job: Job
    total: int
    step: int = 0
    inference_ms: int = 0
    started: float = field(default_factory=time.perf_counter)
    # False for a job claimed ahead (worker overlap) until it really starts: its attempt is not yet spent.
    begun: bool = True
    ran: bool = False  # handed to the pipeline
    _state: RunState = RunState.ACTIVE
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def token(self) -> str:
        assert self.job.lease_token is not None
        return self.job.lease_token

    @property
    def stopping(self) -> bool:
        """Asked to stop (and not yet settled): the pipeline should end this run at its next step."""
        return self._state not in (RunState.ACTIVE, RunState.SETTLED)

    @property
    def settled(self) -> bool:
        return self._state is RunState.SETTLED

    def stop(self, reason: RunState) -> None:
        """Ask the run to stop for ``reason``, unless it is settled or stopping for a stronger one."""
        assert reason in _STOP_STRENGTH and reason is not RunState.ACTIVE, reason
        with self._lock:
            if self._state is not RunState.SETTLED and _STOP_STRENGTH[reason] > _STOP_STRENGTH[self._state]:
                self._state = reason

    def settle(self) -> RunState | None:
        """Mark the run settled; returns the state it had (None when it was settled already)."""
        with self._lock:
            if self._state is RunState.SETTLED:
                return None
            previous, self._state = self._state, RunState.SETTLED
            return previous


class RunBoard:
    """The runs in hand, shared by the worker's threads: one job or batch in the pipeline, and with
    overlap the next one claimed ahead and the finished ones whose outputs are being stored. A run
    leaves the board once settled."""

    def __init__(self) -> None:
        self._runs: list[Run] = []
        self._lock = threading.Lock()

    def hold(self, runs: list[Run]) -> None:
        with self._lock:
            self._runs = [run for run in self._runs if not run.settled] + list(runs)

    def unsettled(self) -> list[Run]:
        with self._lock:
            self._runs = [run for run in self._runs if not run.settled]
            return list(self._runs)

    def stop_all(self, reason: RunState) -> None:
        for run in self.unsettled():
            run.stop(reason)
