"""Runs the requests of one load value against every endpoint, on one schedule.

Endpoints are measured in the same run on the same inputs: request ``i`` goes to every endpoint
(closed loop: in the order A0, B0, A1, B1, ..., each endpoint with its own ``concurrency`` slots;
open loop: at the same instant of one shared schedule), so whatever else the machine is doing hits
all of them alike. Open loop sends on schedule and never waits for a reply (only for a free slot
under ``--max-concurrency``). ``stop`` (Ctrl-C) ends sending at once; requests in flight are
abandoned as ``interrupted`` and their jobs left in ``Endpoint.jobs`` for the caller to cancel (a
submit in flight is let finish, so that its job is known: ``backends.Jobs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.client.backends import Backend, Jobs
from benchmarks.client.inputs import Input
from benchmarks.client.metrics import Record
from benchmarks.client.schedule import Load, arrivals

SETTLE_S = 10.0  # how long a run cut short waits for its submits in flight to answer


@dataclass
class Endpoint:
    label: str
    url: str
    backend: Backend
    client: httpx.AsyncClient
    jobs: Jobs = field(default_factory=Jobs)  # submitted, not seen finished: cancelled on Ctrl-C


@dataclass
class Runner:
    endpoints: list[Endpoint]
    inputs: list[Input]  # one per request index, the same for every endpoint
    seed: int
    timeout_s: float
    stop: asyncio.Event
    on_done: Callable[[Record], None] = lambda _r: None

    def job_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + index) % 2**31

    async def one(self, ep: Endpoint, index: int, load: str, t0: float) -> Record:
        inp = self.inputs[index % len(self.inputs)]
        rec = Record(ep.label, load, index, inp.name, sent_at_s=time.perf_counter() - t0)
        try:
            await asyncio.wait_for(ep.backend.send(ep.client, inp, self.job_seed(index), rec, ep.jobs), self.timeout_s)
        except TimeoutError:
            rec.code, rec.error = "timeout", f"no result within {self.timeout_s:g} s"
        except httpx.HTTPError as exc:
            rec.code, rec.error = type(exc).__name__, str(exc)[:200]
        except asyncio.CancelledError:  # Ctrl-C: the run is ending; this request's result is unknown
            rec.code, rec.error = "interrupted", "the run was interrupted"
        if rec.code:
            rec.ok = False
        self.on_done(rec)
        return rec

    async def warmup(self, count: int) -> None:
        """``count`` requests per endpoint, one at a time, not measured (the first job of a fresh
        server loads and compiles; it would otherwise be one of the measured)."""

        async def endpoint(ep: Endpoint) -> None:
            for i in range(count):
                if self.stop.is_set():
                    return
                await self.one(ep, -1 - i, "warmup", time.perf_counter())

        await self._until_stopped([asyncio.ensure_future(endpoint(ep)) for ep in self.endpoints])

    async def run(self, load: Load, count: int) -> dict[str, tuple[list[Record], float]]:
        """Every endpoint's records for this load and its duration (first send to last reply)."""
        t0 = time.perf_counter()
        slots = {ep.label: asyncio.Semaphore(load.concurrency) for ep in self.endpoints if load.concurrency}
        finished: dict[str, float] = {}

        async def request(ep: Endpoint, index: int) -> Record | None:
            slot = slots.get(ep.label)
            async with slot if slot is not None else contextlib.nullcontext():
                if self.stop.is_set():
                    return None
                rec = await self.one(ep, index, load.name, t0)
            finished[ep.label] = max(finished.get(ep.label, 0.0), time.perf_counter() - t0)
            return rec

        tasks: list[asyncio.Future[Record | None]] = []
        if load.open:
            assert load.rate is not None
            for index, at in enumerate(arrivals(count, load.rate, load.burstiness, self.seed)):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), delay)
                if self.stop.is_set():
                    break
                tasks += [asyncio.ensure_future(request(ep, index)) for ep in self.endpoints]
        else:
            tasks = [asyncio.ensure_future(request(ep, i)) for i in range(count) for ep in self.endpoints]
        records = [r for r in await self._until_stopped(tasks) if r is not None]
        out = {}
        for ep in self.endpoints:
            mine = [r for r in records if r.endpoint == ep.label]
            first = min((r.sent_at_s for r in mine), default=0.0)
            out[ep.label] = (mine, max(finished.get(ep.label, 0.0) - first, 1e-9))
        return out

    async def _until_stopped(self, tasks: list[asyncio.Future[Record | None]]) -> list[Record | None]:
        """All tasks' results; on ``stop``, the unfinished ones are cancelled (and say so)."""
        if not tasks:
            return []
        gathered = asyncio.gather(*tasks, return_exceptions=True)
        stopped = asyncio.ensure_future(self.stop.wait())
        waiters: set[asyncio.Future[Any]] = {gathered, stopped}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        for t in tasks:
            t.cancel()  # Ctrl-C: the unfinished ones end as "interrupted"; no-op for the finished
        results = await gathered
        return [r if isinstance(r, Record) else None for r in results]

    async def cancel_unfinished(self) -> int:
        """POST .../cancel for every job this run submitted and did not see finish, those of the
        submits that were in flight when it stopped included (waited for, a few seconds at most)."""
        await asyncio.gather(*(ep.jobs.settle(SETTLE_S) for ep in self.endpoints))
        calls = [(ep, job) for ep in self.endpoints for job in list(ep.jobs.ids)]
        done = await asyncio.gather(*(ep.backend.cancel(ep.client, job) for ep, job in calls), return_exceptions=True)
        for ep in self.endpoints:
            ep.jobs.ids.clear()
        return sum(1 for d in done if not isinstance(d, BaseException))
