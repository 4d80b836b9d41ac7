"""server/api/tasks/base.py: background tasks end with the app, whatever their thread is doing."""

from __future__ import annotations

import asyncio
import threading

from starlette.concurrency import run_in_threadpool

from server.api.tasks.base import Background


class Stuck(Background):
    """A task whose thread call never returns on its own (a store or socket that hangs)."""

    stop_timeout_s = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    async def run(self) -> None:
        def block() -> None:
            self.entered.set()
            self.release.wait(30)

        await run_in_threadpool(block)


def test_stop_does_not_wait_forever_on_a_stuck_thread() -> None:
    async def scenario() -> bool:
        task = Stuck()
        task.start()
        await run_in_threadpool(task.entered.wait, 5)
        await task.stop()  # returns after stop_timeout_s although the thread is still blocked
        still_blocked = not task.release.is_set()
        task.release.set()
        return still_blocked

    assert asyncio.run(scenario())


def test_stop_waits_for_a_task_that_ends_on_cancel() -> None:
    ended = []

    class Polite(Background):
        async def run(self) -> None:
            try:
                await asyncio.sleep(30)
            finally:
                ended.append(True)

    async def scenario() -> None:
        task = Polite()
        task.start()
        await asyncio.sleep(0)
        await task.stop()

    asyncio.run(scenario())
    assert ended == [True]
