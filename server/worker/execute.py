"""Running claimed jobs and settling each: inputs in, the pipeline, outputs stored, the outcome
written to the store (retried while the store is unavailable, so a finished result waits for the
store to come back instead of being lost, or taking the worker down).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from PIL import Image

from pipelines.lora import LoraRequest
from pipelines.runner import EditInputs, EditResult, RunCancelled, StepCallback
from server.errors import TASK_FAILED, Cancelled, JobError, StoreUnavailable
from server.jobs.contract import Job
from server.jobs.store import JobStore
from server.media.fetch import load_reference
from server.media.images import ImageLimits, encode_image
from server.media.loras import LoraFiles
from server.media.netguard import NetGuard
from server.settings import Settings
from server.storage.base import Storage, new_output_key
from server.worker.failures import failure_for, is_out_of_memory
from server.worker.gpu import free_cuda_memory
from server.worker.runs import Run, RunBoard, RunState
from server.worker.safety import SafetyChecker

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Runner(Protocol):
    """What the worker needs of a pipeline runner (``pipelines.runner.EditRunner``, or a test's fake)."""

    def __call__(self, inputs: EditInputs, on_step: StepCallback | None = None) -> EditResult: ...

    def run_batch(self, batch: list[EditInputs], on_step: StepCallback | None = None) -> list[EditResult]: ...

    def batch_signature(self, inputs: EditInputs) -> tuple[Any, ...] | None: ...


@contextlib.contextmanager
def bound(prediction_id: str) -> Iterator[None]:
    """Log lines inside carry the prediction id."""
    with structlog.contextvars.bound_contextvars(prediction_id=prediction_id):
        yield


# Post-processing of a job's output images before they are encoded (a safety checker, a watermark):
# it returns the images to store, or raises a JobError to fail the job. Runs on the output thread.
OutputStep = Callable[[Job, list[Image.Image]], list[Image.Image]]

# Where a finished run's outputs are encoded, stored and settled: inline on the pipeline thread,
# or handed to the overlap's output threads (server/worker/overlap.py).
Finish = Callable[[Run, Callable[[], None]], None]


@dataclass
class Loaded:
    """A claimed job or batch with its inputs fetched and decoded: ready for the pipeline."""

    runs: list[Run]
    inputs: list[tuple[Run, EditInputs]]


class Executor:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        runner: Runner,
        board: RunBoard,
        abandon: threading.Event,
        safety: SafetyChecker | None = None,
        output_steps: Sequence[OutputStep] = (),
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.runner = runner
        self.board = board
        self.abandon = abandon  # set when the worker must stop now: stop retrying writes too
        self.output_steps = output_steps
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.guard = NetGuard.from_entries(settings.fetch_allow)
        self.lora_files = LoraFiles(settings, self.guard)
        self.safety = safety  # QWEN_EDIT_SAFETY_MODEL's checker, loaded with the model; None: no checks
        self.finish: Finish = self.inline

    def run(self, batch: list[Job]) -> None:
        """Run claimed jobs: compatible ones as one pipeline call, the rest one by one."""
        self.execute(self.load(batch))

    def load(self, batch: list[Job], *, begun: bool = True) -> Loaded:
        """Hold the claimed jobs (the heartbeat keeps their leases from now on) and fetch and decode
        their inputs; a job whose inputs fail is settled here. ``begun=False``: claimed ahead,
        started later by ``begin``."""
        runs = [Run(job=job, total=job.params.num_inference_steps, begun=begun) for job in batch]
        self.board.hold(runs)
        loaded: list[tuple[Run, EditInputs]] = []
        for run in runs:
            if begun:
                self._log_start(run, len(runs))
            with self.job_errors(run):
                loaded.append((run, self._inputs(run.job)))
        return Loaded(runs, loaded)

    def begin(self, loaded: Loaded) -> Loaded:
        """Start jobs claimed ahead: spend their attempts now; drop those stopped meanwhile (cancelled,
        handed back, lease lost) or that already failed on their inputs."""
        for run in loaded.runs:
            if run.begun or run.settled:
                continue
            with bound(run.job.id):
                if run.stopping:
                    self._settle_stopped(run)
                    continue
                self._begin(run)
                if run.stopping:
                    self._settle_stopped(run)
                elif run.begun:
                    self._log_start(run, len(loaded.runs))
        return Loaded(loaded.runs, [(run, inputs) for run, inputs in loaded.inputs if not run.settled])

    def _begin(self, run: Run) -> None:
        began = self._write(run, lambda: self.store.begin(run.job.id, run.token))
        if began is None:
            run.settle()  # the lease is gone (reaped, or the store stayed away while stopping)
            log.warning("lease lost before the job began; abandoned")
            return
        run.job.attempts, run.job.started_at = began.attempts, began.started_at
        run.started = time.perf_counter()
        run.begun = True
        if began.cancel_requested:  # the heartbeat may not have seen it yet
            run.stop(RunState.CANCEL_REQUESTED)

    @staticmethod
    def _log_start(run: Run, batch: int) -> None:
        with bound(run.job.id):
            log.info(
                "job started",
                attempt=run.job.attempts,
                queued_ms=(run.job.started_at or 0) - run.job.created_at,
                batch=batch,
            )

    def execute(self, loaded: Loaded) -> None:
        """The pipeline for loaded (and begun) jobs; each finished run goes to ``finish``."""
        for group in self._groups(loaded.inputs):
            if len(group) > 1 and self._run_together(group):
                continue
            for run, inputs in group:
                if not run.settled:
                    self._run_alone(run, inputs)

    def _inputs(self, job: Job) -> EditInputs:
        p = job.params
        images = [
            load_reference(
                ref,
                storage=self.storage,
                limits=self.limits,
                fetch_timeout_s=self.settings.fetch_timeout_s,
                guard=self.guard,
            )
            for ref in p.images
        ]
        return EditInputs(
            images=images,
            prompt=p.prompt,
            seed=p.seed,
            num_inference_steps=p.num_inference_steps,
            true_cfg_scale=p.true_cfg_scale,
            negative_prompt=p.negative_prompt,
            width=p.width,
            height=p.height,
            loras=[
                LoraRequest(path=str(self.lora_files.local_file(lora.path)), scale=lora.scale, name=lora.path)
                for lora in p.loras
            ],
        )

    def _groups(self, loaded: list[tuple[Run, EditInputs]]) -> list[list[tuple[Run, EditInputs]]]:
        groups: dict[Any, list[tuple[Run, EditInputs]]] = {}
        for n, (run, inputs) in enumerate(loaded):
            key = self.runner.batch_signature(inputs) if len(loaded) > 1 else None
            groups.setdefault(key if key is not None else ("alone", n), []).append((run, inputs))
        return list(groups.values())

    def _run_alone(self, run: Run, inputs: EditInputs) -> None:
        def on_step(step: int, total: int) -> bool:
            run.step, run.total = step, total
            return not run.stopping

        result: EditResult | None = None
        run.ran = True
        with self.job_errors(run):
            result = self.runner(inputs, on_step)
        if result is not None and not run.settled:
            self.finish(run, functools.partial(self._store_result, run, result))

    def _run_together(self, group: list[tuple[Run, EditInputs]]) -> bool:
        """One pipeline call for the group; False if it must be retried job by job."""
        runs = [run for run, _ in group]

        def on_step(step: int, total: int) -> bool:
            for run in runs:
                run.step, run.total = step, total
                if run.stopping:
                    self._settle_stopped(run)  # a cancelled member ends now; the others go on
            return not all(run.settled for run in runs)

        ids = [run.job.id for run in runs]
        for run in runs:
            run.ran = True
        try:
            log.info("batch started", jobs=ids)
            results = self.runner.run_batch([inputs for _, inputs in group], on_step)
        except RunCancelled:
            for run in runs:
                if not run.settled:
                    self._settle_stopped(run)
            return True
        except Exception as exc:  # out of memory at this batch size, say: each job gets its own try
            if is_out_of_memory(exc):
                free_cuda_memory()
            log.warning("batch failed; running its jobs one by one", jobs=ids, error=f"{type(exc).__name__}: {exc}")
            return all(run.settled for run in runs)
        for run, result in zip(runs, results, strict=True):
            if not run.settled:
                self.finish(run, functools.partial(self._store_result, run, result))
        return True

    # --- settling ------------------------------------------------------------------------

    def inline(self, run: Run, store_result: Callable[[], None]) -> None:
        """Finish a run on the pipeline thread (no overlap)."""
        with self.job_errors(run):
            store_result()

    def hand_back(self, run: Run) -> None:
        """Return a run that will not run here to the queue (a job claimed ahead when the worker stops)."""
        run.stop(RunState.HANDING_BACK)
        self._settle_stopped(run)

    def _store_result(self, run: Run, result: EditResult) -> None:
        job = run.job
        run.inference_ms = round(result.seconds * 1000)  # nearest ms: truncating biased "around the pipeline" up
        with bound(job.id):
            images, nsfw = list(result.images), None
            if self.safety is not None:  # a refusal raises here: the job fails, nothing is stored
                checked = self.safety.check(images)
                images, nsfw = checked.images, checked.flags
            for step in self.output_steps:
                images = step(job, images)
            keys = []
            for i, image in enumerate(images):
                key = new_output_key(job.id, i, job.output_format)
                self.storage.put(key, encode_image(image, job.output_format))
                keys.append(key)
            if self._persist(
                run, lambda: self.store.complete(job.id, run.token, keys, run.inference_ms, run.total, nsfw)
            ):
                log.info(
                    "job completed",
                    inference_ms=run.inference_ms,
                    total_ms=int((time.perf_counter() - run.started) * 1000),
                )
            else:
                log.warning("job finished after its lease was lost; result discarded")

    def _settle_stopped(self, run: Run) -> None:
        """End a run that was asked to stop: released (handed back), abandoned (lease lost) or cancelled."""
        job = run.job
        with bound(job.id):
            if run.state is RunState.HANDING_BACK:
                handed = self._persist(run, lambda: self.store.release(job.id, run.token, refund=run.begun))
                log.warning("stopping: job handed back to the queue", released=handed)
            elif run.state is RunState.LEASE_LOST:
                run.settle()
                log.warning("lease lost mid-run; abandoned")
            elif run.ran:
                self._fail(run, Cancelled("Cancelled by the client while running."))
            else:
                self._fail(run, Cancelled("Cancelled by the client before it started."))

    @contextlib.contextmanager
    def job_errors(self, run: Run) -> Iterator[None]:
        """Turn whatever one job raises into its failure, with a useful error; nothing escapes."""
        with bound(run.job.id):
            try:
                yield
            except RunCancelled:
                self._settle_stopped(run)
            except Exception as exc:
                failure = failure_for(exc)
                self._fail(run, failure)
                if failure.code == TASK_FAILED or is_out_of_memory(exc):
                    free_cuda_memory()  # keep serving after a failure that may have left device memory behind

    def _fail(self, run: Run, exc: JobError) -> None:
        job = run.job
        if not run.begun:  # a job claimed ahead fails on its inputs: that was its attempt
            self._begin(run)
            if run.settled:
                return
        if self._persist(run, lambda: self.store.fail(job.id, run.token, exc.message, exc.code, run.inference_ms)):
            log.info("job failed", error=exc.message, code=exc.code)

    def _persist(self, run: Run, write: Callable[[], bool]) -> bool:
        """Write a run's outcome, retrying while the store is unavailable (the heartbeat keeps the
        lease meanwhile); the run is settled once the write landed, or the lease turned out lost.
        Gives up only when the worker must stop now: the lease then expires and the job is rerun."""
        landed = self._write(run, write)
        run.settle()
        return bool(landed)

    def _write(self, run: Run, write: Callable[[], T]) -> T | None:
        """``write()``, retried while the store is unavailable; None if the worker must stop now."""
        delay = 0.5
        while True:
            try:
                return write()
            except StoreUnavailable as exc:
                if self.abandon.is_set():
                    log.error("job store unavailable while stopping: leaving the job to its lease", error=str(exc))
                    return None
                log.warning("job store unavailable; will retry the write", error=str(exc), retry_in_s=delay)
                self.abandon.wait(delay)
                delay = min(5.0, delay * 2)
