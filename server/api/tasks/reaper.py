"""The API's reaper: workers return expired leases to the queue too, this covers the time when every
worker is dead (or none is running yet). Each pass also folds the job counters' pending deltas
(PostgreSQL), so that reading the counters stays a read of a few rows."""

from __future__ import annotations

from server.api.tasks.base import Periodic
from server.jobs.store import JobStore


def reaper_task(store: JobStore, every_s: float) -> Periodic:
    def reap_and_fold() -> None:
        store.reap()
        store.fold_counters()

    return Periodic("reaper", every_s, reap_and_fold)
