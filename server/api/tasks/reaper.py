"""The API's reaper: workers return expired leases to the queue too, this covers the time when every
worker is dead (or none is running yet)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from starlette.concurrency import run_in_threadpool

from server.errors import StoreUnavailable
from server.jobs.store import JobStore

log = structlog.get_logger(__name__)


class Reaper:
    def __init__(self, store: JobStore, every_s: float) -> None:
        self.store = store
        self.every_s = every_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await run_in_threadpool(self.store.reap)
            except StoreUnavailable as exc:
                log.warning("reaper failed", error=str(exc))
