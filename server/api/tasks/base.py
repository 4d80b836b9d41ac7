"""What the API's background tasks share: an asyncio task owned by the app's lifespan, and the
periodic kind that runs a blocking function in a thread, riding out store and storage outages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from starlette.concurrency import run_in_threadpool

from server.errors import StoreUnavailable
from server.storage.base import StorageError

log = structlog.get_logger(__name__)


class Background:
    """``start()`` runs ``run()`` as a task; ``stop()`` cancels it and waits for it to end."""

    # A task cancelled while it waits on ``run_in_threadpool`` ends only when that thread returns
    # (anyio shields the thread call), so a thread stuck on a store or a socket would hold up the
    # whole shutdown; past this we stop waiting and say so.
    stop_timeout_s = 10.0

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=self.stop_timeout_s)
            if not done:
                log.warning("background task did not stop in time", task=type(self).__name__)
                return
            with contextlib.suppress(asyncio.CancelledError):
                self._task.result()

    async def run(self) -> None:
        raise NotImplementedError


class Periodic(Background):
    """``fn()`` in a worker thread every ``every_s``; an outage is logged and tried again next time."""

    def __init__(self, name: str, every_s: float, fn: Callable[[], Any], *, at_start: bool = False) -> None:
        super().__init__()
        self.name = name
        self.every_s = every_s
        self.fn = fn
        self.at_start = at_start

    async def run(self) -> None:
        if not self.at_start:
            await asyncio.sleep(self.every_s)
        while True:
            try:
                await run_in_threadpool(self.fn)
            except (StoreUnavailable, StorageError) as exc:
                log.warning(f"{self.name} failed", error=str(exc))
            await asyncio.sleep(self.every_s)
