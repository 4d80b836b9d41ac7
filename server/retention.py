"""Retention: forget finished predictions and their files after ``QWEN_EDIT_RETENTION_S``.

A periodic task in the API process. Each pass:

1. deletes finished jobs (completed or failed) older than the retention, with their output files,
   their inline input files and their webhook outbox rows;
2. sweeps ``uploads/``, ``inputs/`` and ``outputs/`` for files older than the retention that no
   unfinished job still needs (uploads nobody used, files whose job row is already gone).

Queued and running jobs are never touched, whatever their age: an accepted job is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import delete, select
from starlette.concurrency import run_in_threadpool

from server.jobs.models import Status, jobs, webhook_deliveries
from server.jobs.store import JobStore, now_ms
from server.storage import Storage

log = structlog.get_logger(__name__)

PREFIXES = ("uploads/", "inputs/", "outputs/")
_BATCH = 500


@dataclass
class Swept:
    jobs: int = 0
    files: int = 0


def _keys_of(params: dict[str, Any], outputs: Iterable[str]) -> set[str]:
    keys = {str(k) for k in outputs}
    keys.update(str(ref["key"]) for ref in params.get("images", []) if isinstance(ref, dict) and "key" in ref)
    return keys


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
    finished = [Status.COMPLETED.value, Status.FAILED.value]
    while True:
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.params, jobs.c.outputs)
                .where(jobs.c.status.in_(finished), jobs.c.finished_at < cutoff)
                .limit(_BATCH)
            ).all()
        if not rows:
            break
        ids = [r.id for r in rows]
        for row in rows:
            for key in _keys_of(row.params or {}, row.outputs or []):
                done.files += _delete_file(storage, key)
        with store.engine.begin() as conn:
            conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.job_id.in_(ids)))
            done.jobs += conn.execute(delete(jobs).where(jobs.c.id.in_(ids), jobs.c.status.in_(finished))).rowcount
        if len(rows) < _BATCH:
            break
    older = getattr(storage, "iter_older_than", None)
    if older is not None:
        with store.engine.connect() as conn:
            pending = conn.execute(
                select(jobs.c.params).where(jobs.c.status.in_([Status.CREATED.value, Status.PROCESSING.value]))
            ).all()
        needed: set[str] = set()
        for (params,) in pending:
            needed |= _keys_of(params or {}, [])
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
            except Exception as exc:  # the store restarting: try again next time
                log.warning("retention sweep failed", error=str(exc).splitlines()[0])
            await asyncio.sleep(self.interval_s)
