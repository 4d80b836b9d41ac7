"""Webhook delivery: signed like Standard Webhooks, from a durable outbox, with backoff.

The worker never waits on a receiver: finishing a job writes an outbox row in the same
transaction, and this dispatcher (in the API process) delivers it, retrying with exponential
backoff across restarts until it succeeds or runs out of attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import structlog
from starlette.concurrency import run_in_threadpool

from server.jobs.store import JobStore, WebhookTask
from server.netguard import BlockedDestination, NetGuard, guarded_async_client

log = structlog.get_logger(__name__)

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``v3,<hex HMAC-SHA256 of "{id}.{timestamp}.{body}">``, keyed by the secret without ``whsec_``."""
    key = secret.removeprefix(SECRET_PREFIX).encode()
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v3,{mac}"


def backoff_s(attempt: int) -> float:
    """Delay before retry number ``attempt`` (1-based): 2, 4, 8 ... s, capped at 10 minutes, jittered."""
    return min(600.0, 2.0**attempt) * random.uniform(0.8, 1.2)


class WebhookDispatcher:
    def __init__(
        self,
        store: JobStore,
        secret: str,
        payload_of: Callable[[str], dict[str, Any] | None],
        *,
        max_attempts: int,
        timeout_s: float,
        poll_s: float = 1.0,
        guard: NetGuard | None = None,
    ) -> None:
        self.guard = guard or NetGuard()
        self.store = store
        self.secret = secret
        self.payload_of = payload_of
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._stop = threading.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def listen() -> None:
            sub = self.store.notifier.subscribe("done")
            try:
                while not self._stop.is_set():
                    if sub.wait(0.5):
                        loop.call_soon_threadsafe(self._wake.set)
            finally:
                sub.close()

        self._thread = threading.Thread(target=listen, name="webhook-listener", daemon=True)
        self._thread.start()
        self._tasks.append(asyncio.create_task(self._run()))

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._thread:
            await run_in_threadpool(self._thread.join, 5)

    async def _run(self) -> None:
        # SSRF-guarded (server/netguard.py): receivers on private networks need QWEN_EDIT_FETCH_ALLOW.
        async with guarded_async_client(self.guard, timeout=self.timeout_s) as client:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                self._wake.clear()
                try:
                    tasks = await run_in_threadpool(self.store.claim_webhooks, 16, self.timeout_s * 3)
                except Exception as exc:
                    log.warning("webhook outbox unavailable", error=str(exc))
                    continue
                if tasks:
                    await asyncio.gather(*(self._deliver(client, t) for t in tasks))
                    self._wake.set()  # there may be more due

    async def _deliver(self, client: httpx.AsyncClient, task: WebhookTask) -> None:
        payload = await run_in_threadpool(self.payload_of, task.job_id)
        error: str | None
        if payload is None:
            error = "prediction no longer exists"
            await run_in_threadpool(self.store.webhook_result, task.job_id, error=error, retry_at=None)
            return
        body = json.dumps(payload, separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": task.job_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, task.job_id, timestamp, body),
            "user-agent": "qwen-edit-server/webhooks",
        }
        try:
            self.guard.check_url(task.url)
            resp = await client.post(task.url, content=body, headers=headers)
            error = None if 200 <= resp.status_code < 300 else f"HTTP {resp.status_code}"
        except BlockedDestination as exc:
            error = f"refused: {exc}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempt = task.attempts + 1
        retry_at = None
        if error is not None and attempt < self.max_attempts:
            retry_at = int((time.time() + backoff_s(attempt)) * 1000)
        await run_in_threadpool(self.store.webhook_result, task.job_id, error=error, retry_at=retry_at)
        log.info(
            "webhook delivery",
            prediction_id=task.job_id,
            attempt=attempt,
            ok=error is None,
            error=error,
            gave_up=error is not None and retry_at is None,
        )
