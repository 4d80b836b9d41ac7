"""Big submit bodies go to helper processes before FastAPI reads them (see server/media/prepare.py
for why a thread is not enough).

``BodyOffload`` reads a v3 submit's body as it arrives (the socket reads never block the loop);
when it is ``QWEN_EDIT_BODY_OFFLOAD_BYTES`` or more, the raw bytes go to ``BodyHelpers`` (a pool of
``QWEN_EDIT_BODY_PROCESSES`` spawned processes) which parse it and store its inline images, and the
route receives the small body that comes back, with the tokens' meaning in ``request.state``. Inline
images the job did not take (a refused submit) are deleted when the response has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.registry import VARIANTS, endpoints_of
from server.api.deps import Services
from server.errors import ApiError
from server.jobs.store import new_id
from server.media.images import ImageLimits, ProbedImage, probe_image
from server.media.prepare import PreparedBody, PreparedImage, init_helper, prepare_body, prepare_in_helper
from server.settings import Settings

log = structlog.get_logger(__name__)
STATE_KEY = "prepared_body"
SUBMIT_PATHS = frozenset(f"/api/v3/{model}" for variant in VARIANTS.values() for model in endpoints_of(variant))


@dataclass
class PreparedRequest:
    """What a submit's inline images became, for the route (server/api/submit.py) to take up."""

    job_id: str  # the job's id, chosen before the images were stored under it
    images: dict[str, PreparedImage]
    taken: set[str] = field(default_factory=set)  # keys the created job holds

    @classmethod
    def of(cls, request: Request) -> PreparedRequest | None:
        prepared = getattr(request.state, STATE_KEY, None)
        return prepared if isinstance(prepared, PreparedRequest) else None

    def untaken(self) -> set[str]:
        return {i.key for i in self.images.values() if i.key is not None} - self.taken


class BodyHelpers:
    """The helper processes. Spawned (not forked: the API process has threads, maybe CUDA), at the
    first big body (a server that never sees one never pays for them); a pool that broke (a helper
    killed) is replaced, and the request that found it broken is prepared in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.settings.body_processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_helper,
            initargs=(self.settings,),
        )

    async def prepare(self, raw: bytes, job_id: str, svc: Services) -> PreparedBody | None:
        limits = ImageLimits(svc.settings.max_image_bytes, svc.settings.max_image_pixels)
        if self.settings.body_processes > 0:
            done, result = await self._in_helper(prepare_in_helper, raw, job_id)
            if done:
                return cast(PreparedBody | None, result)
        return await run_in_threadpool(prepare_body, raw, job_id, svc.storage, limits)

    async def probe(self, data: bytes, limits: ImageLimits) -> ProbedImage:
        """``probe_image`` (raises ValueError) off the loop: in a helper for big files (an upload's
        bytes), in a thread for small ones."""
        if self.settings.body_processes > 0 and len(data) >= self.settings.body_offload_bytes:
            done, result = await self._in_helper(probe_image, data, limits)
            if done:
                return cast(ProbedImage, result)
        return await run_in_threadpool(probe_image, data, limits)

    async def _in_helper(self, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """(True, fn(*args)) run in a helper; (False, None) when the pool broke under it."""
        if self._pool is None:
            self._pool = self._start()
        try:
            return True, await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BrokenProcessPool:
            log.warning("body helper process died; starting new ones")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            return False, None

    @property
    def pids(self) -> list[int]:
        """The helpers' process ids (for tests and ops): none before the first big body."""
        processes = getattr(self._pool, "_processes", None) or {}
        return list(processes)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class BodyOffload:
    def __init__(self, app: ASGIApp, threshold: int) -> None:
        self.app = app
        self.threshold = threshold

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in SUBMIT_PATHS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        prepared: PreparedRequest | None = None
        if size >= self.threshold:
            raw, prepared = await self._prepare(scope, raw)
            if prepared is not None:
                scope.setdefault("state", {})[STATE_KEY] = prepared
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = dict(scope, headers=[*headers, (b"content-length", str(len(raw)).encode())])
        if prepared is None:
            await self.app(scope, _replay(raw, receive), send)
            return

        async def send_after_cleanup(message: Message) -> None:
            # The route has decided by the time it answers (a sync submit: after its job ended): what
            # the job did not take goes now, before the client hears, so no refused body leaves a file.
            if message["type"] == "http.response.start" and (untaken := prepared.untaken()):
                await run_in_threadpool(_delete, scope["app"].state.services, untaken)
            await send(message)

        await self.app(scope, _replay(raw, receive), send_after_cleanup)

    async def _prepare(self, scope: Scope, raw: bytes) -> tuple[bytes, PreparedRequest | None]:
        """The body the route gets instead of ``raw``, and what its tokens stand for."""
        app = scope["app"]
        svc: Services = app.state.services
        try:
            svc.auth(Request(scope))
        except ApiError:
            # Not worth a helper's time: an empty object still reaches the route's key check (401).
            return b"{}", None
        job_id = new_id()
        body = await app.state.body_helpers.prepare(raw, job_id, svc)
        if body is None:  # not a JSON object: the route refuses it as before
            return raw, None
        return body.body, PreparedRequest(job_id, body.images)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then whatever the server says next (a disconnect)

    return replay


def _delete(svc: Services, keys: set[str]) -> None:
    for key in keys:
        with contextlib.suppress(Exception):  # a leftover file is the retention sweep's, never a failed response
            svc.storage.delete(key)
