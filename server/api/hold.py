"""Holding a sync request open while its jobs run, and letting go when its client does.

A sync request (``enable_sync_mode``, and every OpenAI ``/v1/images/edits`` call) holds the
connection for up to ``QWEN_EDIT_SYNC_TIMEOUT_S``. Clients give up sooner (WaveSpeed's ComfyUI node
reads for 60 s, then retries): a job of a request whose client hung up while it was still queued
has nobody left to hand its id to, so it is cancelled rather than run for no one. A job a worker
already runs goes on (its result stays readable under its id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import structlog
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.errors import ApiError
from server.jobs.store import JobStore

log = structlog.get_logger(__name__)
T = TypeVar("T")

GONE_REASON = "Cancelled before it started: the client of its sync request disconnected."


class ClientGone(ApiError):
    """The client closed the connection during the hold (nginx's 499; nobody reads the answer)."""

    status_code = 499


async def disconnected(request: Request) -> None:
    """Return once the client closes the connection (the body has been read: any further
    ``receive`` waits for ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def hold(request: Request, store: JobStore, job_ids: Sequence[str], waiting: Awaitable[T]) -> T:
    """``await waiting``, unless the client hangs up first: then cancel those of ``job_ids`` still
    queued and raise ClientGone."""
    wait_task = asyncio.ensure_future(waiting)
    gone_task = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({wait_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (wait_task, gone_task):
            if not task.done():
                task.cancel()
    if wait_task.done() and not wait_task.cancelled():
        return wait_task.result()
    cancelled = [job_id for job_id in job_ids if await run_in_threadpool(store.cancel_queued, job_id, GONE_REASON)]
    log.info("sync client disconnected", prediction_ids=list(job_ids), cancelled=cancelled)
    raise ClientGone("The client disconnected before the prediction finished.")
