"""Worker processes started beside the API by ``qwen-edit serve`` (or alone by ``qwen-edit worker
--workers N``).

Each worker is its own process (``qwen-edit worker --slot N``), so a pipeline run never holds the
API's event loop or GIL, and a crash takes down one worker, not the server. A worker that cannot
load its model exits with ``EXIT_LOAD_FAILED``: the server then stops too (non-zero), rather than
accept jobs it cannot run. Other exits are restarted with backoff.

Stopping: each worker runs in a process group of its own, so a signal to the server's group (Ctrl-C,
``kill -TERM -PGID``) reaches the supervisor only; it then asks each worker to drain with
``DRAIN_SIGNAL``, which a worker takes once however often it comes (systemd's default, a SIGTERM to
every process of the unit, plus the supervisor's own request, is still one drain). A second request
to the server hands the jobs back now (``HANDBACK_SIGNAL``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping

import structlog

from server.settings import Settings

log = structlog.get_logger(__name__)

EXIT_LOAD_FAILED = 3
DRAIN_SIGNAL = signal.SIGUSR1  # finish the job in hand (up to QWEN_EDIT_WORKER_DRAIN_S), then exit
HANDBACK_SIGNAL = signal.SIGUSR2  # hand the job in hand back to the queue now, then exit
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Linux: if the API process dies (even by SIGKILL), its workers die with it.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def worker_env(settings: Settings, slot: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of worker ``slot``: its GPU and its variant's weights."""
    env = dict(environ)
    gpus = env.get("CUDA_VISIBLE_DEVICES")
    slots, world = settings.worker_slots, settings.layout.world_size
    if world > 1:  # a group: its own `world` GPUs (server/worker/ranks.py)
        from server.worker.ranks import group_gpus

        mine = group_gpus(slot, world, slots, gpus)
        if mine is not None:
            env["CUDA_VISIBLE_DEVICES"] = mine
    elif slots > 1 and gpus is None:
        env["CUDA_VISIBLE_DEVICES"] = str(slot)  # one GPU per worker
    elif slots > 1 and gpus:
        listed = [g.strip() for g in gpus.split(",") if g.strip()]
        env["CUDA_VISIBLE_DEVICES"] = listed[slot % len(listed)]
    # A configured worker id names the machine's GPU slots; each slot needs its own, or one slot's
    # restart would requeue the jobs its siblings are running.
    if settings.worker_id and slots > 1:
        env["QWEN_EDIT_WORKER_ID"] = f"{settings.worker_id}/{slot}"
    if settings.parallel:
        env["QWEN_EDIT_PARALLEL"] = settings.parallel  # as resolved at start-up ("auto" decided once)
    # Each slot serves one variant (Settings.variants), with that variant's weights.
    variant = settings.slot_variant(slot)
    env["QWEN_EDIT_VARIANT"] = variant
    weights = settings.weights_for(variant)
    if weights:
        env["QWEN_EDIT_MODEL"] = weights
    else:
        env.pop("QWEN_EDIT_MODEL", None)
    return env


class WorkerSupervisor:
    def __init__(self, settings: Settings, on_fatal: Callable[[str], None], drain_timeout_s: float = 600.0) -> None:
        self.settings = settings
        self.on_fatal = on_fatal
        self.drain_timeout_s = drain_timeout_s
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()
        # The watch thread outlives the drain: PR_SET_PDEATHSIG fires when the *thread* that
        # spawned a worker exits, so a worker respawned by it would be SIGKILLed mid-job otherwise.
        self._drained = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self, slot: int) -> subprocess.Popen[bytes]:
        env = worker_env(self.settings, slot, os.environ)
        cmd = [sys.executable, "-m", "server.cli", "worker", "--slot", str(slot)]
        # A group of its own: the server's group signal (Ctrl-C) is the supervisor's to pass on, once.
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent, process_group=0)
        log.info("worker started", slot=slot, pid=proc.pid)
        return proc

    def start(self) -> None:
        if self.settings.layout.parallel and self.settings.embedded_workers % self.settings.layout.world_size:
            log.warning(
                "workers do not divide into groups: some GPUs stay idle",
                workers=self.settings.embedded_workers,
                group_size=self.settings.layout.world_size,
                groups=self.settings.worker_slots,
            )
        for slot in range(self.settings.worker_slots):
            self.procs[slot] = self._spawn(slot)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        restarts: dict[int, list[float]] = {}
        while not self._drained.wait(0.5):
            for slot, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or self._stop.is_set():
                    continue
                if code == EXIT_LOAD_FAILED:
                    self.on_fatal(f"worker {slot} could not load the model (see its log above)")
                    return
                recent = [t for t in restarts.get(slot, []) if time.monotonic() - t < 300] + [time.monotonic()]
                restarts[slot] = recent
                if len(recent) > 5:
                    self.on_fatal(f"worker {slot} keeps dying (exit {code}, {len(recent)} times in 5 minutes)")
                    return
                delay = min(30.0, 2.0 ** (len(recent) - 1))
                log.error("worker exited; restarting", slot=slot, exit_code=code, delay_s=delay)
                if self._stop.wait(delay):
                    continue
                self.procs[slot] = self._spawn(slot)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def hand_back_now(self) -> None:
        """A second stop request: every worker hands its job back to the queue at once."""
        log.warning("stop requested again: workers hand their jobs back to the queue now")
        self._signal_all(HANDBACK_SIGNAL)

    def stop(self) -> None:
        """Ask every worker to finish its job and exit; kill those still running after the drain timeout."""
        self._stop.set()
        if any(proc.poll() is None for proc in self.procs.values()):
            log.info(
                "stopping: workers finish the jobs in hand, then exit",
                drain_s=self.settings.worker_drain_s,
                hint="signal again (Ctrl-C) to hand the jobs back to the queue now",
            )
        self._signal_all(DRAIN_SIGNAL)
        deadline = time.monotonic() + self.drain_timeout_s
        for slot, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing it", slot=slot)
                proc.kill()
                proc.wait()
        self._drained.set()
