"""Running claimed jobs and settling each: inputs in, the pipeline, outputs stored, the outcome
written to the store (retried while the store is unavailable, so a finished result waits for the
store to come back instead of being lost, or taking the worker down).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import structlog

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

log = structlog.get_logger(__name__)


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


class Executor:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        runner: Runner,
        board: RunBoard,
        abandon: threading.Event,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.runner = runner
        self.board = board
        self.abandon = abandon  # set when the worker must stop now: stop retrying writes too
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.guard = NetGuard.from_entries(settings.fetch_allow)
        self.lora_files = LoraFiles(settings, self.guard)

    def run(self, batch: list[Job]) -> None:
        """Run claimed jobs: compatible ones as one pipeline call, the rest one by one."""
        runs = [Run(job=job, total=job.params.num_inference_steps) for job in batch]
        self.board.hold(runs)
        try:
            loaded: list[tuple[Run, EditInputs]] = []
            for run in runs:
                with self._job_errors(run):
                    log.info(
                        "job started",
                        attempt=run.job.attempts,
                        queued_ms=(run.job.started_at or 0) - run.job.created_at,
                        batch=len(runs),
                    )
                    loaded.append((run, self._inputs(run.job)))
            for group in self._groups(loaded):
                if len(group) > 1 and self._run_together(group):
                    continue
                for run, inputs in group:
                    if not run.settled:
                        self._run_alone(run, inputs)
        finally:
            self.board.clear()

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

        with self._job_errors(run):
            self._store_result(run, self.runner(inputs, on_step))

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
                with self._job_errors(run):
                    self._store_result(run, result)
        return True

    # --- settling ------------------------------------------------------------------------

    def _store_result(self, run: Run, result: EditResult) -> None:
        job = run.job
        run.inference_ms = int(result.seconds * 1000)
        with bound(job.id):
            keys = []
            for i, image in enumerate(result.images):
                key = new_output_key(job.id, i, job.output_format)
                self.storage.put(key, encode_image(image, job.output_format))
                keys.append(key)
            if self._persist(run, lambda: self.store.complete(job.id, run.token, keys, run.inference_ms, run.total)):
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
                handed = self._persist(run, lambda: self.store.release(job.id, run.token))
                log.warning("stopping: job handed back to the queue", released=handed)
            elif run.state is RunState.LEASE_LOST:
                run.settle()
                log.warning("lease lost mid-run; abandoned")
            else:
                self._fail(run, Cancelled("Cancelled by the client while running."))

    @contextlib.contextmanager
    def _job_errors(self, run: Run) -> Iterator[None]:
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
        if self._persist(run, lambda: self.store.fail(job.id, run.token, exc.message, exc.code, run.inference_ms)):
            log.info("job failed", error=exc.message, code=exc.code)

    def _persist(self, run: Run, write: Callable[[], bool]) -> bool:
        """Write a run's outcome, retrying while the store is unavailable (the heartbeat keeps the
        lease meanwhile); the run is settled once the write landed, or the lease turned out lost.
        Gives up only when the worker must stop now: the lease then expires and the job is rerun."""
        delay = 0.5
        while True:
            try:
                landed = write()
                break
            except StoreUnavailable as exc:
                if self.abandon.is_set():
                    log.error("job store unavailable while stopping: leaving the job to its lease", error=str(exc))
                    run.settle()
                    return False
                log.warning("job store unavailable; will retry the write", error=str(exc), retry_in_s=delay)
                self.abandon.wait(delay)
                delay = min(5.0, delay * 2)
        run.settle()
        return landed
