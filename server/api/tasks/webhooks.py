"""Webhook delivery: signed like Standard Webhooks, from the durable outbox, with backoff.

The worker never waits on a receiver: finishing a job writes an outbox row in the same
transaction, and this dispatcher (in the API process) delivers it, retrying with exponential
backoff across restarts until it succeeds or runs out of attempts. Whatever goes wrong with one
delivery (a refused or unparsable URL, a receiver that hangs, a bug) is that row's failed attempt:
it never stops the dispatcher, so one bad row cannot hold up anybody else's webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import secrets
import time

import httpx
import structlog
from starlette.concurrency import run_in_threadpool

from server.api.render import Renderer
from server.api.tasks.base import Background
from server.errors import StoreUnavailable, first_line
from server.jobs.contract import Done
from server.jobs.outbox import Delivery
from server.jobs.store import JobStore, now_ms
from server.media.netguard import BlockedDestination, InvalidURL, NetGuard, guarded_async_client

log = structlog.get_logger(__name__)

SECRET_PREFIX = "whsec_"
BATCH = 16


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``v3,<hex HMAC-SHA256 of "{id}.{timestamp}.{body}">``, keyed by the secret without ``whsec_``."""
    key = secret.removeprefix(SECRET_PREFIX).encode()
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v3,{mac}"


def backoff_s(attempt: int, first_s: float = 2.0) -> float:
    """Delay before retry number ``attempt`` (1-based): 2, 4, 8 ... s (from ``first_s``), capped at
    10 minutes, jittered."""
    return min(600.0, first_s * 2.0 ** (attempt - 1)) * random.uniform(0.8, 1.2)


class WebhookDispatcher(Background):
    def __init__(
        self,
        store: JobStore,
        renderer: Renderer,
        secret: str,
        *,
        max_attempts: int,
        timeout_s: float,
        poll_s: float = 1.0,
        first_retry_s: float = 2.0,
        guard: NetGuard | None = None,
    ) -> None:
        super().__init__()
        self.guard = guard or NetGuard()
        self.store = store
        self.renderer = renderer
        self.secret = secret
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.first_retry_s = first_retry_s
        self._wake = asyncio.Event()

    def wake(self, _dones: list[Done] | None = None) -> None:
        """A fan-out consumer: some job ended, a delivery may be due."""
        self._wake.set()

    async def run(self) -> None:
        # SSRF-guarded (server/media/netguard.py): receivers on private networks need QWEN_EDIT_FETCH_ALLOW.
        async with guarded_async_client(self.guard, timeout=self.timeout_s) as client:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                self._wake.clear()
                try:
                    due = await run_in_threadpool(self.store.outbox.claim, BATCH, self.timeout_s * 3, now_ms())
                except StoreUnavailable as exc:
                    log.warning("webhook outbox unavailable", error=str(exc))
                    continue
                if due:
                    await asyncio.gather(*(self._deliver_one(client, d) for d in due))
                    self._wake.set()  # there may be more due

    async def _deliver_one(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        """Attempt one delivery and record it; nothing raised here reaches the dispatcher's loop."""
        try:
            error, final = await self._attempt(client, delivery)
        except Exception as exc:  # a bug or a URL nobody can parse: this row's failed attempt, no one else's
            log.exception("webhook delivery raised", prediction_id=delivery.job_id)
            error, final = f"{type(exc).__name__}: {first_line(exc)}", False
        attempt = delivery.attempts + 1
        retry_at = None
        if error is not None and not final and attempt < self.max_attempts:
            retry_at = int((time.time() + backoff_s(attempt, self.first_retry_s)) * 1000)
        try:
            await run_in_threadpool(
                self.store.outbox.record, delivery.job_id, error=error, retry_at=retry_at, now=now_ms()
            )
        except StoreUnavailable as exc:  # the lease runs out and the row is tried again
            log.warning("could not record a webhook attempt", prediction_id=delivery.job_id, error=str(exc))
            return
        log.info(
            "webhook delivery",
            prediction_id=delivery.job_id,
            attempt=attempt,
            ok=error is None,
            error=error,
            gave_up=error is not None and retry_at is None,
        )

    async def _attempt(self, client: httpx.AsyncClient, delivery: Delivery) -> tuple[str | None, bool]:
        """(error or None, whether the failure is final)."""
        job = await run_in_threadpool(self.store.get, delivery.job_id)
        if job is None:
            return "prediction no longer exists", True
        body = json.dumps(self.renderer.webhook_body(job), separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.job_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, delivery.job_id, timestamp, body),
            "user-agent": "qwen-edit-server/webhooks",
        }
        try:
            self.guard.check_url(delivery.url)
            resp = await client.post(delivery.url, content=body, headers=headers)
        except (BlockedDestination, InvalidURL) as exc:  # no retry can change these
            return f"refused: {exc}", True
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}", False
        return (None if 200 <= resp.status_code < 300 else f"HTTP {resp.status_code}"), False
