"""The API's reaper: workers return expired leases to the queue too, this covers the time when every
worker is dead (or none is running yet)."""

from __future__ import annotations

from server.api.tasks.base import Periodic
from server.jobs.store import JobStore


def reaper_task(store: JobStore, every_s: float) -> Periodic:
    return Periodic("reaper", every_s, store.reap)
