"""The GPU worker: claim -> load inputs -> run the pipeline -> encode -> store -> finish.

It talks to the job store and storage through the same interfaces as the API, so it runs the
same beside the API (``qwen-edit serve``) or on another machine (``qwen-edit worker``). One job
at a time; a heartbeat thread renews the lease, publishes progress and notices cancellation.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from PIL import Image

from pipelines.lora import LoraRequest
from pipelines.registry import Variant
from pipelines.runner import EditInputs, EditResult, RunCancelled
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

Runner = Callable[[EditInputs, Callable[[int, int], bool] | None], EditResult]


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
        self._running: _Running | None = None
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
        """Stop the running job at its next step and return it to the queue (no attempt spent)."""
        with self._lock:
            if self._running is not None:
                self._running.handback = True

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
                self.process(job)
        finally:
            sub.close()
            self.set_state("stopped")
            self.stop_event.set()
            self._beat_stop.set()

    def _safely(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # the database restarting: back off, keep the process
            log.warning("job store unavailable", error=str(exc).splitlines()[0])
            self.stop_event.wait(1.0)
            return None

    # --- one job -------------------------------------------------------------------------

    def process(self, job: Job) -> None:
        assert self.runner is not None and job.lease_token is not None
        token = job.lease_token
        structlog.contextvars.bind_contextvars(prediction_id=job.id)
        running = _Running(job=job, total=int(job.params["num_inference_steps"]))
        with self._lock:
            self._running = running
        started = time.perf_counter()
        inference_ms = 0
        try:
            log.info("job started", attempt=job.attempts, queued_ms=(job.started_at or 0) - job.created_at)
            inputs = self._inputs(job)
            if self.settings.fault_injection:  # test only: see server/faults.py
                faults.inject(inputs.prompt, job.attempts, self.stop_event)

            def on_step(step: int, total: int) -> bool:
                running.step, running.total = step, total
                return not (running.cancel or running.lost or running.handback)

            result = self.runner(inputs, on_step)
            inference_ms = int(result.seconds * 1000)
            keys = []
            for i, image in enumerate(result.images):
                key = new_output_key(job.id, i, job.output_format)
                self.storage.put(key, encode_image(image, job.output_format))
                keys.append(key)
            if self.store.complete(job.id, token, keys, inference_ms):
                log.info(
                    "job completed", inference_ms=inference_ms, total_ms=int((time.perf_counter() - started) * 1000)
                )
            else:
                log.warning("job finished after its lease was lost; result discarded")
        except RunCancelled:
            if running.handback and not running.cancel:
                handed = self.store.release(job.id, token)
                log.warning("stopping: job handed back to the queue", released=handed)
            elif running.lost:
                log.warning("lease lost mid-run; abandoned")
            else:
                self._fail(job, token, Cancelled("Cancelled by the client while running."), inference_ms)
        except JobError as exc:
            self._fail(job, token, exc, inference_ms)
        except StorageError as exc:
            self._fail(job, token, JobError(f"Could not store the output: {exc}", INTERNAL_ERROR), inference_ms)
        except ValueError as exc:  # the pipeline's own input checks
            self._fail(job, token, JobError(f"Invalid input: {exc}", 1401), inference_ms)
        except Exception as exc:
            if is_cuda_oom(exc):
                log.error("CUDA out of memory", error=str(exc).splitlines()[0] if str(exc) else "")
                free_cuda_memory()
                message = (
                    "The GPU ran out of memory running this prediction; try a smaller size or fewer images. "
                    f"({str(exc).splitlines()[0] if str(exc) else 'CUDA out of memory'})"
                )
                self._fail(job, token, JobError(message, INTERNAL_ERROR), inference_ms)
                return
            log.exception("job raised")
            self._fail(job, token, JobError(f"Task execution failed: {type(exc).__name__}: {exc}", TASK_FAILED), 0)
            self._after_crash(exc)
        finally:
            with self._lock:
                self._running = None
            structlog.contextvars.unbind_contextvars("prediction_id")

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
                running = self._running
            if running is not None and running.job.lease_token:
                try:
                    beat = self.store.heartbeat(
                        running.job.id, running.job.lease_token, self.settings.lease_s, running.step, running.total
                    )
                    running.cancel = running.cancel or beat.cancel_requested
                    running.lost = not beat.alive
                except Exception as exc:
                    log.warning("heartbeat failed", error=str(exc).splitlines()[0])
            if time.monotonic() - last_state > 2.0:
                last_state = time.monotonic()
                self._publish_state()
