"""Retention: forget finished predictions and their files after ``QWEN_EDIT_RETENTION_S``.

A periodic task in the API process. Each pass:

1. the store deletes finished jobs (completed or failed) older than the retention, with their
   webhook outbox rows, in bounded batches; their output files and inline inputs go by key;
2. ``uploads/``, ``inputs/`` and ``outputs/`` are swept for files older than the retention that no
   unfinished job still needs (uploads nobody used, files whose job row is already gone).

Queued and running jobs are never touched, whatever their age: an accepted job is never lost.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import structlog

from server.api.tasks.base import Periodic
from server.jobs.store import JobStore, now_ms
from server.storage.base import Storage

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


def retention_task(store: JobStore, storage: Storage, retention_s: float, interval_s: float) -> Periodic | None:
    """A sweep every ``interval_s``; None when retention is off (``retention_s`` 0)."""
    if retention_s <= 0:
        return None

    def sweep_and_log() -> None:
        swept = sweep(store, storage, retention_s)
        if swept.jobs or swept.files:
            log.info("retention sweep", jobs_deleted=swept.jobs, files_deleted=swept.files)

    return Periodic("retention sweep", interval_s, sweep_and_log, at_start=True)
