"""A worker as a group of processes, one per GPU, over ``torch.distributed`` (NCCL on GPUs, gloo on
the CPU): ``QWEN_EDIT_PARALLEL`` (pipelines/layout.py).

Rank 0 is the worker the supervisor started: it claims jobs, heartbeats them and writes their
results, exactly as a lone worker does. It starts the other ranks itself (the same command, with its
TCPStore's address and their rank in the environment) so that they live and die with it: each dies
with its parent (PR_SET_PDEATHSIG), and rank 0 exits as soon as one of them exits. The supervisor
then restarts the group as a whole, and the job in hand goes back to the queue by the lease rules,
as when a lone worker dies.

Every rank loads the same pipeline and runs the same pipeline call on the same inputs (channel.py),
step by step in lockstep; only the transformer's passes are split (pipelines/parallel.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any, NoReturn

import structlog
from PIL import Image

from pipelines.errors import PipelineInputError
from pipelines.layout import Layout
from pipelines.runner import EditInputs, EditResult, EditRunner, RunCancelled, StepCallback
from server.settings import Settings
from server.worker.channel import Channel
from server.worker.ranks import RankInfo

log = structlog.get_logger(__name__)

EXIT_RANK_DIED = 4
SIZE_MULTIPLE = 32  # sides that keep image token counts divisible by sequence degrees up to 4


class WorkerGroup:
    """This process's place in its group: rank 0 (which starts the others) or a follower."""

    def __init__(self, settings: Settings, layout: Layout, info: RankInfo, store: Any) -> None:
        self.settings = settings
        self.layout = layout
        self.info = info
        self.store = store
        self.channel = Channel(store, settings.parallel_timeout_s)
        self.followers: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()

    @property
    def rank(self) -> int:
        return self.info.rank

    @classmethod
    def lead(cls, settings: Settings, layout: Layout, argv: list[str]) -> WorkerGroup:
        """Rank 0: open the store, start ranks 1..N-1 with ``argv`` (this worker's own command), join."""
        from torch.distributed import TCPStore

        timeout = timedelta(seconds=settings.parallel_timeout_s)
        store = TCPStore("127.0.0.1", 0, None, True, timeout, wait_for_workers=False)
        info = RankInfo(0, layout.world_size, "127.0.0.1", store.port)
        group = cls(settings, layout, info, store)
        group._spawn_followers(argv)
        # Watching before joining: a rank that dies while the group forms must not leave rank 0
        # waiting in init_process_group for the whole timeout.
        threading.Thread(target=group._watch, name="group-watch", daemon=True).start()
        group._join()
        return group

    @classmethod
    def follow(cls, settings: Settings, layout: Layout, info: RankInfo) -> WorkerGroup:
        from torch.distributed import TCPStore

        timeout = timedelta(seconds=settings.parallel_timeout_s)
        store = TCPStore(info.store_host, info.store_port, None, False, timeout)
        group = cls(settings, layout, info, store)
        group._join()
        return group

    def _spawn_followers(self, argv: list[str]) -> None:
        from server.worker.supervisor import _die_with_parent

        for rank in range(1, self.layout.world_size):
            env = dict(os.environ) | RankInfo(rank, self.layout.world_size, "127.0.0.1", self.info.store_port).env()
            proc = subprocess.Popen([sys.executable, "-m", "server.cli", *argv], env=env, preexec_fn=_die_with_parent)
            log.info("group rank started", rank=rank, pid=proc.pid, layout=str(self.layout))
            self.followers.append(proc)

    def _join(self) -> None:
        import torch
        import torch.distributed as dist

        on_gpu = self.settings.device != "cpu" and torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(self.rank)
        dist.init_process_group(
            "nccl" if on_gpu else "gloo",
            store=dist.PrefixStore("pg", self.store),
            rank=self.rank,
            world_size=self.layout.world_size,
            timeout=timedelta(seconds=self.settings.parallel_timeout_s),
        )
        log.info(
            "joined the worker group", rank=self.rank, world_size=self.layout.world_size, backend=dist.get_backend()
        )

    def _watch(self) -> None:
        """Rank 0: a rank that exits takes the group down (the supervisor restarts it whole); a
        collective waiting on the dead rank would otherwise hang until its timeout."""
        while not self._stopping.wait(0.5):
            for rank, proc in enumerate(self.followers, start=1):
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    from server.worker.supervisor import EXIT_LOAD_FAILED

                    # A rank that could not load the model: the group cannot either (the server stops).
                    self.abort(
                        f"rank {rank} of the worker group exited with {code}",
                        EXIT_LOAD_FAILED if code == EXIT_LOAD_FAILED else EXIT_RANK_DIED,
                    )

    def lost_rank(self, wait_s: float = 5.0) -> bool:
        """Rank 0: whether a follower exited (within ``wait_s``: a collective may fail a moment
        before the dead rank's exit shows)."""
        deadline = time.monotonic() + wait_s
        while True:
            if any(proc.poll() is not None for proc in self.followers):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def abort(self, why: str, code: int = EXIT_RANK_DIED) -> NoReturn:
        """Rank 0: end the group now. The job in hand is neither failed nor released: like a worker
        that dies, its lease lapses or the restarted worker requeues it (``release_owned_by``)."""
        log.error(why + ": restarting the group; the job in hand goes back to the queue")
        self._stopping.set()
        self._kill_followers()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _kill_followers(self) -> None:
        for proc in self.followers:
            if proc.poll() is None:
                proc.kill()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Rank 0: tell the others to stop, wait for them (then kill what is left)."""
        self._stopping.set()
        try:
            self.channel.send_stop()
        except Exception as exc:  # the store is gone: the followers follow it
            log.warning("could not tell the group to stop", error=str(exc))
        for proc in self.followers:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._destroy()

    def _destroy(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def serve_follower(self, runner: EditRunner) -> None:
        """Ranks 1..N-1: run what rank 0 sends, in lockstep, until it says stop."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # rank 0 decides when the group stops
        while (inputs := self.channel.receive(self._stopping)) is not None:
            try:
                runner(inputs, lambda step, _total: self.channel.decision(step))
            except (RunCancelled, PipelineInputError):
                continue  # rank 0 ended the same run the same way
            except Exception as exc:
                # Rank 0 may be waiting on this rank in a collective: say why and exit, which frees it
                # at once (its collective fails) and fails the job with this error.
                self.channel.report_error(self.rank, type(exc).__name__, str(exc)[:2000])
                raise
        log.info("worker group stopped", rank=self.rank)
        self._destroy()


class GroupRunner:
    """Rank 0's runner: each run goes to the other ranks first; each step's go-on decision with it.

    Dynamic batching does not apply: a group runs one job at a time. Under sequence parallelism an
    output size whose sides are not multiples of 32 is generated at the next multiple and resized to
    the size asked for. A run that fails for any reason but its input leaves the other ranks
    possibly inside a collective: ``broken`` then says why, and the worker restarts the group."""

    def __init__(self, inner: EditRunner, group: WorkerGroup) -> None:
        self.inner = inner
        self.group = group
        self.broken: str | None = None

    def batch_signature(self, inputs: EditInputs) -> tuple[Any, ...] | None:
        return None

    def run_batch(self, batch: list[EditInputs], on_step: StepCallback | None = None) -> list[EditResult]:
        return [self(inputs, on_step) for inputs in batch]

    def __call__(self, inputs: EditInputs, on_step: StepCallback | None = None) -> EditResult:
        self.inner.check_inputs(inputs)  # bad input fails here, before any rank starts
        asked = (inputs.width, inputs.height)
        run = group_inputs(inputs, self.group.layout)
        channel = self.group.channel
        channel.send_run(run)

        def lockstep(step: int, total: int) -> bool:
            return channel.decide(step, on_step(step, total) if on_step is not None else True)

        try:
            result = self.inner(run, lockstep)
        except (RunCancelled, PipelineInputError):
            raise
        except Exception as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            if not self.group.lost_rank():
                raise
            failed = self.group.channel.errors(self.group.layout.world_size)
            if not failed:  # killed, not failed: the job is not at fault and goes back to the queue
                self.group.abort("a rank of the group died mid-run")
            rank, error = min(failed.items())
            raise rank_error(rank, error) from exc
        if asked[0] and asked[1] and (run.width, run.height) != asked:
            size = (asked[0], asked[1])
            result.images = [image.resize(size, Image.Resampling.LANCZOS) for image in result.images]
        return result


def rank_error(rank: int, error: dict[str, str]) -> Exception:
    """The error another rank's run failed with, as rank 0 fails the job with it (out of memory stays
    out of memory: it maps to its own task code)."""
    message = f"rank {rank}: {error['kind']}: {error['message']}"
    if error["kind"] == "OutOfMemoryError":
        import torch

        return torch.cuda.OutOfMemoryError(message)
    return RuntimeError(message)


def group_inputs(inputs: EditInputs, layout: Layout) -> EditInputs:
    """The inputs every rank runs: under sequence parallelism, output sides rounded up to multiples of 32."""
    if layout.sequence == 1 or not (inputs.width and inputs.height):
        return inputs
    up = [-(-side // SIZE_MULTIPLE) * SIZE_MULTIPLE for side in (inputs.width, inputs.height)]
    if up == [inputs.width, inputs.height]:
        return inputs
    from dataclasses import replace

    return replace(inputs, width=up[0], height=up[1])
