"""The prediction object, rendered in one place for every door: result routes, sync mode, webhooks
(bare, with ``input`` echoed) and the OpenAI-compatible route (its output links)."""

from __future__ import annotations

import base64
from typing import Any

from starlette.concurrency import run_in_threadpool

from server.api.schemas import iso_ms
from server.errors import INTERNAL_ERROR, TIMEOUT
from server.jobs.contract import Job, Status
from server.settings import Settings
from server.storage.base import Storage
from server.storage.factory import file_url


class Renderer:
    def __init__(self, storage: Storage, settings: Settings) -> None:
        self.storage = storage
        self.settings = settings

    def file_url(self, base: str, key: str) -> str:
        return file_url(self.storage, self.settings, base, key)

    def prediction(self, job: Job, base: str, *, with_input: bool = False) -> dict[str, Any]:
        """The ``data`` object of a prediction (and, bare, the webhook body). May read storage."""
        if job.status == Status.COMPLETED:
            if job.base64_output:
                outputs = [base64.b64encode(self.storage.get(key)).decode() for key in job.outputs]
            else:
                outputs = [self.file_url(base, key) for key in job.outputs]
        else:
            outputs = []
        data: dict[str, Any] = {"id": job.id, "model": job.model}
        if with_input:
            data["input"] = job.input
        data.update(
            {
                "outputs": outputs,
                "urls": {"get": f"{base}/api/v3/predictions/{job.id}/result"},
                "has_nsfw_contents": self.nsfw_flags(job, len(outputs)),
                "status": job.status.value,
                "created_at": iso_ms(job.created_at),
                "error": job.error or "",
                "timings": {"inference": int(job.inference_ms)},
            }
        )
        if job.status == Status.FAILED:
            data["code"] = job.error_code or INTERNAL_ERROR
        data["seed"] = job.seed
        if job.progress_total:
            data["progress"] = {"step": job.progress_step, "total": job.progress_total}
        return data

    @staticmethod
    def nsfw_flags(job: Job, count: int) -> list[bool]:
        """The safety checker's verdict per output; false where none ran (QWEN_EDIT_SAFETY_MODEL unset)."""
        flags = list(job.nsfw or [])
        return [bool(flag) for flag in flags[:count]] + [False] * max(0, count - len(flags))

    async def render(self, job: Job, base: str) -> dict[str, Any]:
        """``prediction`` from the event loop: in a worker thread only where it does I/O (inline
        base64 outputs read from storage, presigned links from the object store)."""
        if job.status == Status.COMPLETED and (job.base64_output or self.settings.storage_presign):
            return await run_in_threadpool(self.prediction, job, base)
        return self.prediction(job, base)

    def webhook_body(self, job: Job) -> dict[str, Any]:
        return self.prediction(job, job.base_url, with_input=True)

    @staticmethod
    def sync_timed_out(data: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """A sync-mode answer for a job still running at the hold's end: it goes on asynchronously."""
        data.update(
            status=Status.PROCESSING.value,
            code=TIMEOUT,
            error=f"Sync mode timed out after {timeout_s:g} seconds. "
            "The prediction is still processing asynchronously.",
        )
        return data
