"""How one request is sent and timed: v3 async (submit, then poll), v3 sync, OpenAI's images/edits.

Polling decides the resolution of every async figure. A result poll costs the server little (about
2 ms, see benchmarks/overhead.py), but polling every job every 10 ms from the moment it is queued
would load the server being measured. So a job is polled slowly (``--poll-interval``) while it waits
or while ``data.progress`` says its end is still far, and every ``--fast-poll-interval`` once the
steps seen so far predict the end within one slow interval (or when the server gives no progress).
The gap before the poll that saw the job finished is each request's ``resolution_ms``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from benchmarks.client.inputs import Input
from benchmarks.client.metrics import Record

BACKENDS = ("v3", "v3-sync", "openai")
T = TypeVar("T")


class Fatal(Exception):
    """The run cannot go on (the endpoint is unreachable, or refuses the key): one line, exit 2."""


@dataclass(frozen=True)
class Options:
    model: str = "wavespeed-ai/qwen-image/edit"
    steps: int | None = None
    size: str | None = None  # overrides each input's own
    download: bool = True
    poll_s: float = 0.25
    fast_poll_s: float = 0.015


@dataclass
class Jobs:
    """One endpoint's jobs that this run submitted and has not seen finish (cancelled at the end of a
    run cut short), and its submits in flight. A submit cut short by Ctrl-C or a timeout may still
    create its job on the server: it is let finish (``submit``), so that its job is known and
    cancelled too, instead of running for nobody."""

    ids: set[str] = field(default_factory=set)
    _submits: set[asyncio.Future[Any]] = field(default_factory=set)

    def add(self, job_id: str) -> None:
        self.ids.add(job_id)

    def discard(self, job_id: str) -> None:
        self.ids.discard(job_id)

    async def submit(self, call: Awaitable[T]) -> T:
        """``await call``; cancelled meanwhile, the caller stops waiting but ``call`` goes on (what
        it learns, it records itself) until ``settle``."""
        task = asyncio.ensure_future(call)
        self._submits.add(task)
        task.add_done_callback(self._forget)
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._submits.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: one nobody waited for any more fails quietly (its record says why)

    async def settle(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for the submits still in flight, so that their jobs are known."""
        if self._submits:
            await asyncio.wait(set(self._submits), timeout=timeout_s)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


class Poller:
    """When to poll next: slowly while the job waits or its end is far, fast when it is near.

    The end is predicted from the steps seen change: the time per step between the first and the
    latest change (the first step seen is not timed: it may have begun long before). Without that
    (the first steps, or no progress at all) and in the decode after the last step, polls are fast.
    A job that goes from queued to finished between two slow polls is seen late: its
    ``resolution_ms`` says by how much."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.changes: list[tuple[int, float]] = []  # (step, when first seen), from the second step seen
        self.last_step: int | None = None

    def interval(self, data: dict[str, Any]) -> float:
        fast, slow = self.opts.fast_poll_s, self.opts.poll_s
        if data.get("status") != "processing":
            return slow  # queued: nothing to resolve until it starts
        progress = data.get("progress")
        if not progress:
            return fast  # no progress (the hosted API): the end may come any time
        step, total, now = int(progress["step"]), int(progress["total"]), time.perf_counter()
        if self.last_step is not None and step != self.last_step:
            self.changes.append((step, now))
        self.last_step = step
        if step >= total:
            return fast  # decoding the output: the end is near, and not predictable from the steps
        if len(self.changes) >= 2:
            (s0, t0), (s1, t1) = self.changes[0], self.changes[-1]
            eta = (t1 - t0) / (s1 - s0) * (total - step) - (now - t1)
            return min(slow, max(fast, eta / 2))  # halve the predicted wait: fast when close
        # No estimate yet (the first steps, or a job of a few steps whose encoders take most of its
        # time): a short job can run its remaining steps between two slow polls.
        return fast


class Backend:
    name = "v3"

    def __init__(self, opts: Options) -> None:
        self.opts = opts

    def body(self, inp: Input, seed: int, sync: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": inp.prompt,
            "image": inp.image,
            "seed": seed,
            "enable_sync_mode": sync,
            "enable_base64_output": False,
        }
        if self.opts.size or inp.size:
            body["size"] = self.opts.size or inp.size
        if self.opts.steps:
            body["num_inference_steps"] = self.opts.steps
        return body

    async def preflight(self, client: httpx.AsyncClient) -> None:
        """Reachable, and the key is accepted (an unknown id is a 404 then, never a job)."""
        _check(await _call(client, "GET", "/api/v3/predictions/0000000000000000/result"), client)

    async def describe(self, client: httpx.AsyncClient) -> dict[str, Any] | None:
        """The server's own description (this server's /readyz ``config``), where it has one."""
        try:
            r = await client.get("/readyz", timeout=10)
            return dict(r.json().get("config") or {}) or None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    async def cancel(self, client: httpx.AsyncClient, job_id: str) -> None:
        await client.post(f"/api/v3/predictions/{job_id}/cancel", timeout=5)

    async def send(self, client: httpx.AsyncClient, inp: Input, seed: int, rec: Record, jobs: Jobs) -> None:
        started = time.perf_counter()
        r = await jobs.submit(self._submit(client, self.body(inp, seed, sync=False), rec, jobs))
        rec.upload_ms = _ms(started)
        if not _accepted(r, rec):
            return
        data = r.json()["data"]
        poller, last, gap = Poller(self.opts), time.perf_counter(), 0.0
        while data["status"] not in ("completed", "failed"):
            await asyncio.sleep(poller.interval(data))
            r = await client.get(f"/api/v3/predictions/{rec.id}/result")
            rec.polls += 1
            if not _accepted(r, rec):
                return
            data = r.json()["data"]
            gap, last = time.perf_counter() - last, time.perf_counter()
        jobs.discard(rec.id)
        rec.resolution_ms = gap * 1000
        await self.finish(client, data, started, rec)

    async def _submit(self, client: httpx.AsyncClient, body: dict[str, Any], rec: Record, jobs: Jobs) -> httpx.Response:
        """The POST, and the job it created recorded (whether or not anyone still waits for it)."""
        r = await client.post(f"/api/v3/{self.opts.model}", json=body)
        if r.status_code == 200:
            rec.id = r.json()["data"]["id"]
            jobs.add(rec.id)
        return r

    async def finish(self, client: httpx.AsyncClient, data: dict[str, Any], started: float, rec: Record) -> None:
        if data["status"] != "completed":
            rec.code, rec.error = str(data.get("code") or data["status"]), str(data.get("error") or "")
            return
        done_ms = _ms(started)
        rec.inference_ms = float((data.get("timings") or {}).get("inference") or 0.0)
        await self.download(client, (data.get("outputs") or [None])[0], rec)
        if not rec.code:
            rec.ok, rec.e2el_ms = True, _ms(started)
            rec.queue_ms = max(0.0, done_ms - (rec.upload_ms or 0.0) - rec.inference_ms)

    async def download(self, client: httpx.AsyncClient, url: str | None, rec: Record) -> None:
        if not self.opts.download or not url:
            return
        started = time.perf_counter()
        r = await client.get(url)
        if r.status_code != 200:
            rec.code, rec.error = f"download {r.status_code}", url
            return
        rec.download_ms, rec.output_bytes = _ms(started), len(r.content)


class SyncBackend(Backend):
    """One held POST (``enable_sync_mode``): no polling; a job still running when the server's hold
    ends (code 5004) is polled to its end."""

    name = "v3-sync"

    async def send(self, client: httpx.AsyncClient, inp: Input, seed: int, rec: Record, jobs: Jobs) -> None:
        started = time.perf_counter()
        r = await client.post(f"/api/v3/{self.opts.model}", json=self.body(inp, seed, sync=True))
        if not _accepted(r, rec):
            return
        data = r.json()["data"]
        rec.id = data["id"]
        while data["status"] not in ("completed", "failed"):
            jobs.add(rec.id)
            await asyncio.sleep(self.opts.fast_poll_s)
            r = await client.get(f"/api/v3/predictions/{rec.id}/result")
            rec.polls += 1
            if not _accepted(r, rec):
                return
            data = r.json()["data"]
        jobs.discard(rec.id)
        rec.resolution_ms = 0.0
        await self.finish(client, data, started, rec)


class OpenAIBackend(Backend):
    """``POST /v1/images/edits`` (multipart, answered when done): this server's OpenAI door, or any
    OpenAI-compatible image server. No job id (nothing to cancel), no server timings."""

    name = "openai"

    async def preflight(self, client: httpx.AsyncClient) -> None:
        _check(await _call(client, "POST", "/v1/images/edits", files={"prompt": (None, "")}), client)

    async def send(self, client: httpx.AsyncClient, inp: Input, seed: int, rec: Record, jobs: Jobs) -> None:
        if inp.image_bytes is None:
            rec.code, rec.error = "input", "the openai backend uploads the image: give a file or data URI"
            return
        fields = {"prompt": inp.prompt, "seed": str(seed), "response_format": "url", "model": self.opts.model}
        size = self.opts.size or inp.size
        if size:
            fields["size"] = size.replace("*", "x")
        if self.opts.steps:
            fields["num_inference_steps"] = str(self.opts.steps)
        started = time.perf_counter()
        r = await client.post("/v1/images/edits", data=fields, files={"image": ("image", inp.image_bytes)})
        if r.status_code != 200:
            rec.code, rec.error = f"http {r.status_code}", r.text[:200]
            return
        rec.resolution_ms = 0.0
        item = (r.json().get("data") or [{}])[0]
        await self.download(client, item.get("url"), rec)
        if not rec.code:
            rec.ok, rec.e2el_ms = True, _ms(started)


def backend(name: str, opts: Options) -> Backend:
    return {"v3": Backend, "v3-sync": SyncBackend, "openai": OpenAIBackend}[name](opts)


def _accepted(r: httpx.Response, rec: Record) -> bool:
    if r.status_code == 200:
        return True
    rec.code = f"http {r.status_code}"
    try:
        body = r.json()
        rec.error = str(body.get("message") or body.get("error") or r.text)[:200]
    except ValueError:
        rec.error = r.text[:200]
    return False


async def _call(client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> httpx.Response:
    try:
        return await client.request(method, path, timeout=10, **kw)
    except httpx.HTTPError as exc:
        raise Fatal(f"cannot reach {client.base_url} ({type(exc).__name__}: {exc or 'no answer'})") from None


def _check(r: httpx.Response, client: httpx.AsyncClient) -> None:
    if r.status_code in (401, 403):
        raise Fatal(f"{client.base_url} refused the key (HTTP {r.status_code}): pass --key or set WAVESPEED_API_KEY")
