"""The GPU worker: claim -> load inputs -> run the pipeline -> encode -> store -> finish.

It talks to the job store and storage through the same interfaces as the API, so it runs the
same beside the API (``qwen-edit serve``) or on another machine (``qwen-edit worker``). One job
at a time; a heartbeat thread renews the lease, publishes progress and notices cancellation.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from PIL import Image

from pipelines.lora import LoraRequest
from pipelines.registry import Variant
from pipelines.runner import EditInputs, EditResult, EditRunner, RunCancelled
from server import faults
from server.errors import INTERNAL_ERROR, TASK_FAILED, Cancelled, JobError
from server.gpustats import cuda_memory, free_cuda_memory, is_cuda_oom, publish_gpu_memory
from server.inputs import ImageLimits, load_reference
from server.jobs.models import Job, WorkerInfo
from server.jobs.store import JobStore, now_ms
from server.netguard import NetGuard
from server.settings import Settings
from server.storage import Storage, StorageError, new_output_key

log = structlog.get_logger(__name__)

Runner = EditRunner


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=95)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Running:
    job: Job
    step: int = 0
    total: int = 0
    cancel: bool = False
    lost: bool = False
    handback: bool = False  # the worker is stopping and its drain time ran out: release the job
    settled: bool = False  # completed, failed or released: nothing more to write for it
    inference_ms: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def token(self) -> str:
        assert self.job.lease_token is not None
        return self.job.lease_token

    @property
    def stopping(self) -> bool:
        return self.cancel or self.lost or self.handback


@contextlib.contextmanager
def _bound(prediction_id: str) -> Iterator[None]:
    """Log lines inside carry the prediction id."""
    with structlog.contextvars.bound_contextvars(prediction_id=prediction_id):
        yield


class Worker:
    def __init__(
        self, settings: Settings, store: JobStore, storage: Storage, variant: Variant, worker_id: str | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.variant = variant
        self.id = worker_id or settings.worker_id or f"{socket.gethostname()}/0"
        self.runner: Runner | None = None
        self.stop_event = threading.Event()
        self._beat_stop = threading.Event()  # the heartbeat outlives stop_event while a job drains
        self._running: list[_Running] = []
        self._lock = threading.Lock()
        self._state = "loading"
        self._detail = ""
        self._started_at = now_ms()
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.guard = NetGuard.from_entries(settings.fetch_allow)

    # --- life cycle ----------------------------------------------------------------------

    def set_state(self, state: str, detail: str = "") -> None:
        self._state, self._detail = state, detail
        self._publish_state()

    def _publish_state(self) -> None:
        info = WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            variant=self.variant.name,
            state=self._state,
            detail=self._detail,
            started_at=self._started_at,
            heartbeat_at=now_ms(),
        )
        try:
            self.store.worker_state(info)
            gpu = cuda_memory()
            if gpu is not None:
                publish_gpu_memory(self.store, self.id, gpu)
        except Exception as exc:
            log.warning("could not record worker state", error=str(exc))

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            if self.stop_event.is_set():  # asked twice: hand the job back now
                self.hand_back()
                return
            log.info("worker stopping", signal=signal.Signals(signum).name, drain_s=self.settings.worker_drain_s)
            self.stop_event.set()
            timer = threading.Timer(self.settings.worker_drain_s, self.hand_back)
            timer.daemon = True
            timer.start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def hand_back(self) -> None:
        """Stop the running jobs at their next step and return them to the queue (no attempt spent)."""
        with self._lock:
            for running in self._running:
                running.handback = True

    def serve(self, runner: Runner) -> None:
        """Run jobs until told to stop."""
        self.runner = runner
        released = self.store.release_owned_by(self.id)
        if released:
            log.warning("requeued jobs left running by this worker's previous life", count=released)
        self.set_state("ready")
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        sub = self.store.notifier.subscribe("jobs")
        last_reap = 0.0
        parent = os.getppid()
        try:
            while not self.stop_event.is_set():
                if time.monotonic() - last_reap > max(1.0, self.settings.lease_s / 4):
                    last_reap = time.monotonic()
                    self._safely(self.store.reap)
                if os.getppid() != parent and parent != 1:
                    log.warning("parent process died: stopping")
                    break
                job = self._safely(lambda: self.store.claim(self.id, [self.variant.name], self.settings.lease_s))
                if job is None:
                    sub.wait(self.settings.poll_interval_s)
                    continue
                self.process_batch([job, *self._compatible(job, sub)])
        finally:
            sub.close()
            self.set_state("stopped")
            self.stop_event.set()
            self._beat_stop.set()

    def _compatible(self, job: Job, sub: Any) -> list[Job]:
        """Queued jobs that may share ``job``'s pipeline call, waiting up to ``batch_wait_ms`` for them."""
        size = self.settings.batch_max_size
        if size <= 1 or job.batch_key is None:
            return []
        key = job.batch_key
        more: list[Job] = []
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(more) < size - 1:
            got = self._safely(
                lambda: self.store.claim_compatible(self.id, key, size - 1 - len(more), self.settings.lease_s)
            )
            more.extend(got or [])
            left = deadline - time.monotonic()
            if len(more) >= size - 1 or left <= 0 or self.stop_event.is_set():
                break
            sub.wait(min(left, 0.05))
        return more

    def _safely(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # the database restarting: back off, keep the process
            log.warning("job store unavailable", error=str(exc).splitlines()[0])
            self.stop_event.wait(1.0)
            return None

    # --- jobs ----------------------------------------------------------------------------

    def process(self, job: Job) -> None:
        self.process_batch([job])

    def process_batch(self, batch: list[Job]) -> None:
        """Run claimed jobs: compatible ones as one pipeline call, the rest one by one."""
        assert self.runner is not None
        runs = [_Running(job=job, total=int(job.params["num_inference_steps"])) for job in batch]
        with self._lock:
            self._running = runs
        try:
            loaded: list[tuple[_Running, EditInputs]] = []
            for running in runs:
                with self._job_errors(running):
                    log.info(
                        "job started",
                        attempt=running.job.attempts,
                        queued_ms=(running.job.started_at or 0) - running.job.created_at,
                        batch=len(runs),
                    )
                    inputs = self._inputs(running.job)
                    if self.settings.fault_injection:  # test only: see server/faults.py
                        faults.inject(inputs.prompt, running.job.attempts, self.stop_event)
                    loaded.append((running, inputs))
            for group in self._groups(loaded):
                if len(group) > 1 and self._run_together(group):
                    continue
                for running, inputs in group:
                    if not running.settled:
                        self._run_alone(running, inputs)
        finally:
            with self._lock:
                self._running = []

    def _groups(self, loaded: list[tuple[_Running, EditInputs]]) -> list[list[tuple[_Running, EditInputs]]]:
        assert self.runner is not None
        groups: dict[Any, list[tuple[_Running, EditInputs]]] = {}
        for n, (running, inputs) in enumerate(loaded):
            key = self.runner.batch_signature(inputs) if len(loaded) > 1 else None
            groups.setdefault(key if key is not None else ("alone", n), []).append((running, inputs))
        return list(groups.values())

    def _run_alone(self, running: _Running, inputs: EditInputs) -> None:
        assert self.runner is not None

        def on_step(step: int, total: int) -> bool:
            running.step, running.total = step, total
            return not running.stopping

        with self._job_errors(running):
            result = self.runner(inputs, on_step)
            self._store_result(running, result)

    def _run_together(self, group: list[tuple[_Running, EditInputs]]) -> bool:
        """One pipeline call for the group; False if it must be retried job by job."""
        runs = [running for running, _ in group]

        def on_step(step: int, total: int) -> bool:
            for running in runs:
                running.step, running.total = step, total
                if running.stopping and not running.settled:
                    self._settle_stopped(running)  # a cancelled member ends now; the others go on
            return not all(running.settled for running in runs)

        ids = [running.job.id for running in runs]
        try:
            log.info("batch started", jobs=ids)
            assert self.runner is not None
            results = self.runner.run_batch([inputs for _, inputs in group], on_step)
        except RunCancelled:
            for running in runs:
                if not running.settled:
                    self._settle_stopped(running)
            return True
        except Exception as exc:  # out of memory at this batch size, say: each job gets its own try
            if is_cuda_oom(exc):
                free_cuda_memory()
            log.warning("batch failed; running its jobs one by one", jobs=ids, error=f"{type(exc).__name__}: {exc}")
            return all(running.settled for running in runs)
        for running, result in zip(runs, results, strict=True):
            if not running.settled:
                with self._job_errors(running):
                    self._store_result(running, result)
        return True

    def _store_result(self, running: _Running, result: EditResult) -> None:
        job, token = running.job, running.token
        running.inference_ms = int(result.seconds * 1000)
        with _bound(job.id):
            keys = []
            for i, image in enumerate(result.images):
                key = new_output_key(job.id, i, job.output_format)
                self.storage.put(key, encode_image(image, job.output_format))
                keys.append(key)
            running.settled = True
            if self.store.complete(job.id, token, keys, running.inference_ms):
                log.info(
                    "job completed",
                    inference_ms=running.inference_ms,
                    total_ms=int((time.perf_counter() - running.started) * 1000),
                )
            else:
                log.warning("job finished after its lease was lost; result discarded")

    def _settle_stopped(self, running: _Running) -> None:
        """End a job whose run was stopped: cancelled, its lease lost, or handed back."""
        running.settled = True
        job, token = running.job, running.token
        with _bound(job.id):
            if running.handback and not running.cancel:
                handed = self.store.release(job.id, token)
                log.warning("stopping: job handed back to the queue", released=handed)
            elif running.lost:
                log.warning("lease lost mid-run; abandoned")
            else:
                self._fail(job, token, Cancelled("Cancelled by the client while running."), running.inference_ms)

    @contextlib.contextmanager
    def _job_errors(self, running: _Running) -> Iterator[None]:
        """Turn whatever one job raises into its failure, with a useful error; nothing escapes."""
        job, token = running.job, running.token
        with _bound(job.id):
            try:
                yield
            except RunCancelled:
                self._settle_stopped(running)
            except Exception as exc:
                running.settled = True
                failure = self._failure(exc)
                self._fail(job, token, failure, running.inference_ms)
                if failure.code == TASK_FAILED:
                    self._after_crash(exc)

    def _failure(self, exc: Exception) -> JobError:
        if isinstance(exc, JobError):
            return exc
        if isinstance(exc, StorageError):
            return JobError(f"Could not store the output: {exc}", INTERNAL_ERROR)
        if isinstance(exc, ValueError):  # the pipeline's own input checks
            return JobError(f"Invalid input: {exc}", 1401)
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        if is_cuda_oom(exc):
            log.error("CUDA out of memory", error=first_line)
            free_cuda_memory()
            return JobError(
                "The GPU ran out of memory running this prediction; try a smaller size or fewer images. "
                f"({first_line or 'CUDA out of memory'})",
                INTERNAL_ERROR,
            )
        log.exception("job raised")
        return JobError(f"Task execution failed: {type(exc).__name__}: {exc}", TASK_FAILED)

    def _after_crash(self, exc: Exception) -> None:
        """Keep serving after a failure that may have left device memory behind."""
        free_cuda_memory()

    def _fail(self, job: Job, token: str, exc: JobError, inference_ms: int) -> None:
        if self.store.fail(job.id, token, exc.message, exc.code, inference_ms):
            log.info("job failed", error=exc.message, code=exc.code)

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
            for ref in p["images"]
        ]
        return EditInputs(
            images=images,
            prompt=p["prompt"],
            seed=int(p["seed"]),
            num_inference_steps=int(p["num_inference_steps"]),
            true_cfg_scale=float(p["true_cfg_scale"]),
            negative_prompt=p.get("negative_prompt"),
            width=p.get("width"),
            height=p.get("height"),
            loras=[LoraRequest(path=lr["path"], scale=float(lr.get("scale", 1.0))) for lr in p.get("loras") or []],
        )

    # --- heartbeat -----------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        interval = min(0.5, self.settings.lease_s / 4)
        last_state = 0.0
        while not self._beat_stop.wait(interval):
            with self._lock:
                runs = [running for running in self._running if not running.settled]
            for running in runs:
                try:
                    beat = self.store.heartbeat(
                        running.job.id, running.token, self.settings.lease_s, running.step, running.total
                    )
                    running.cancel = running.cancel or beat.cancel_requested
                    running.lost = running.lost or not beat.alive
                except Exception as exc:
                    log.warning("heartbeat failed", error=str(exc).splitlines()[0])
            if time.monotonic() - last_state > 2.0:
                last_state = time.monotonic()
                self._publish_state()
