"""Retention: forget finished predictions and their files after ``QWEN_EDIT_RETENTION_S``.

A periodic task in the API process. Each pass:

1. the store deletes finished jobs (completed or failed) older than the retention, with their
   webhook outbox rows, in bounded batches; their output files and inline inputs go by key;
2. ``uploads/``, ``inputs/`` and ``outputs/`` are swept for files older than the retention that no
   unfinished job still needs (uploads nobody used, files whose job row is already gone).

Queued and running jobs are never touched, whatever their age: an accepted job is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog
from starlette.concurrency import run_in_threadpool

from server.errors import StoreUnavailable
from server.jobs.store import JobStore, now_ms
from server.storage.base import Storage, StorageError

log = structlog.get_logger(__name__)

PREFIXES = ("uploads/", "inputs/", "outputs/")
BATCH = 500


@dataclass
class Swept:
    jobs: int = 0
    files: int = 0


def _delete_file(storage: Storage, key: str) -> bool:
    path = storage.local_path(key)
    existed = path is not None or storage.exists(key)
    storage.delete(key)
    if path is not None:  # drop the per-job / per-upload folder once empty
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    return existed


def sweep(store: JobStore, storage: Storage, retention_s: float) -> Swept:
    """One retention pass (blocking: run it in a thread)."""
    cutoff = now_ms() - int(retention_s * 1000)
    done = Swept()
    while True:
        gone = store.purge_finished(cutoff, BATCH)
        for job in gone:
            for key in {*job.outputs, *job.params.stored_keys()}:
                done.files += _delete_file(storage, key)
        done.jobs += len(gone)
        if len(gone) < BATCH:
            break
    older = getattr(storage, "iter_older_than", None)
    if older is not None:
        needed = store.unfinished_input_keys()
        for prefix in PREFIXES:
            for key in list(older(prefix, retention_s)):
                if key not in needed and _delete_file(storage, key):
                    done.files += 1
    return done


class RetentionTask:
    """Runs ``sweep`` every ``interval_s`` (disabled when ``retention_s`` is 0)."""

    def __init__(self, store: JobStore, storage: Storage, retention_s: float, interval_s: float) -> None:
        self.store = store
        self.storage = storage
        self.retention_s = retention_s
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.retention_s > 0:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                swept = await run_in_threadpool(sweep, self.store, self.storage, self.retention_s)
                if swept.jobs or swept.files:
                    log.info("retention sweep", jobs_deleted=swept.jobs, files_deleted=swept.files)
            except (StoreUnavailable, StorageError) as exc:  # restarting: try again next time
                log.warning("retention sweep failed", error=str(exc))
            await asyncio.sleep(self.interval_s)
