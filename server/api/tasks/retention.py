"""Retention: forget finished predictions and their files after ``QWEN_EDIT_RETENTION_S``.

A periodic task in the API process. Each pass costs what it deletes (nothing due: two index probes):

1. the store deletes finished jobs (completed or failed) older than the retention, with their
   webhook outbox rows, in bounded batches, by index; their output files and inline inputs go by key;
2. uploads older than the retention go by key too (the uploads table, by index), unless an
   unfinished job still needs them; their rows stay until their signed URL has expired too, so
   that it still cannot be used twice.

The storage tree is never walked: a file no job or upload row names (a crash between storing an
input and inserting its job) is not found by retention.

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

BATCH = 500


@dataclass
class Swept:
    jobs: int = 0
    files: int = 0


def delete_file(storage: Storage, key: str) -> bool:
    path = storage.local_path(key)
    existed = path is not None or storage.exists(key)
    storage.delete(key)
    if path is not None:  # drop the per-job / per-upload folder once empty
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    return existed


def sweep(store: JobStore, storage: Storage, retention_s: float, upload_ttl_s: float = 0) -> Swept:
    """One retention pass (blocking: run it in a thread)."""
    now = now_ms()
    cutoff = now - int(retention_s * 1000)
    done = Swept()
    while True:
        gone = store.retention.purge_finished(cutoff, BATCH)
        for job in gone:
            for key in {*job.outputs, *job.params.stored_keys()}:
                done.files += delete_file(storage, key)
        done.jobs += len(gone)
        if len(gone) < BATCH:
            break
    done.files += _sweep_uploads(store, storage, cutoff, now - int(upload_ttl_s * 1000))
    return done


def _sweep_uploads(store: JobStore, storage: Storage, cutoff: int, expired_before: int) -> int:
    files = 0
    needed: set[str] | None = None  # read once, and only when some upload is due
    after: tuple[int, str] | None = None
    while page := store.retention.uploads_before(cutoff, BATCH, after):
        if needed is None:
            needed = store.retention.unfinished_input_keys()
        files += sum(delete_file(storage, key) for _, key in page if key not in needed)
        store.retention.forget_uploads([key for at, key in page if at < expired_before and key not in needed])
        after = page[-1]
    return files


def retention_task(
    store: JobStore, storage: Storage, retention_s: float, interval_s: float, upload_ttl_s: float = 0
) -> Periodic | None:
    """A sweep every ``interval_s``; None when retention is off (``retention_s`` 0)."""
    if retention_s <= 0:
        return None

    def sweep_and_log() -> None:
        swept = sweep(store, storage, retention_s, upload_ttl_s)
        if swept.jobs or swept.files:
            log.info("retention sweep", jobs_deleted=swept.jobs, files_deleted=swept.files)

    return Periodic("retention sweep", interval_s, sweep_and_log, at_start=True)
