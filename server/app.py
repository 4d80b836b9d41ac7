"""The FastAPI application: wiring only. ``create_app(settings)`` builds it; the lifespan opens the
job store (migrating it), storage and the background tasks (sync waiters, webhooks, reaper).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from server.api import media, openai, ops, playground, predictions
from server.api import metrics as metrics_api
from server.api.deps import Services
from server.api.errors import install_error_handlers
from server.auth import Authenticator
from server.jobs.store import JobStore
from server.metrics import JobStoreCollector, RequestTimer, build_registry
from server.middleware import BodyLimit, JsonByDefault
from server.netguard import NetGuard
from server.ratelimit import RateLimiter
from server.retention import RetentionTask
from server.settings import Settings
from server.storage_factory import build_storage, storage_description
from server.uploads import UploadSigner
from server.waiter import CompletionWaiter
from server.webhooks import WebhookDispatcher, new_secret

log = structlog.get_logger(__name__)


def api_keys(settings: Settings, store: JobStore) -> list[str]:
    """Configured keys; with none (and auth on), one generated key kept in the store and data_dir/api_key."""
    if settings.api_keys or settings.auth_disabled:
        return list(settings.api_keys)
    key = store.meta_value("generated_api_key", lambda: "qe_" + secrets.token_urlsafe(24))
    path = settings.data_dir / "api_key"
    if not path.exists() or path.read_text().strip() != key:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
    log.warning(
        "no API keys configured: generated one",
        path=str(path.resolve()),
        hint="set QWEN_EDIT_API_KEYS, or QWEN_EDIT_AUTH_DISABLED=true for local use",
    )
    return [key]


def build_services(settings: Settings) -> Services:
    store = JobStore(settings.resolved_database_url, run_dir=settings.run_dir)
    store.migrate()
    storage = build_storage(settings)
    secret = settings.webhook_secret or store.meta_value("webhook_secret", new_secret)
    signing_key = store.meta_value("upload_signing_key", lambda: secrets.token_hex(32))
    return Services(
        settings=settings,
        store=store,
        storage=storage,
        auth=Authenticator(settings, api_keys(settings, store)),
        waiter=CompletionWaiter(store, poll_s=settings.poll_interval_s),
        uploads=UploadSigner(bytes.fromhex(signing_key), settings.upload_ttl_s),
        webhook_secret=secret,
        variants=settings.served_variants,
        rate_limiter=RateLimiter(settings.rate_limit_per_minute),
    )


async def _reaper(store: JobStore, every_s: float) -> None:
    # Workers reap too; this covers the time when every worker is dead.
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(store.reap)
        except Exception as exc:
            log.warning("reaper failed", error=str(exc))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = await run_in_threadpool(build_services, settings)
        app.state.services = svc

        def webhook_payload(job_id: str) -> dict[str, Any] | None:
            job = svc.store.get(job_id)
            return predictions.prediction_data(job, svc, job.base_url, with_input=True) if job else None

        dispatcher = WebhookDispatcher(
            svc.store,
            svc.webhook_secret,
            webhook_payload,
            max_attempts=settings.webhook_max_attempts,
            timeout_s=settings.webhook_timeout_s,
            poll_s=settings.poll_interval_s,
            guard=NetGuard.from_entries(settings.fetch_allow),
        )
        collector = JobStoreCollector(svc.store)
        app.state.metrics_registry.register(collector)
        retention = RetentionTask(svc.store, svc.storage, settings.retention_s, settings.retention_interval_s)
        await svc.waiter.start()
        await dispatcher.start()
        retention.start()
        reaper = asyncio.create_task(_reaper(svc.store, max(1.0, settings.lease_s / 4)))
        # Everything built so far lives as long as the process: out of the collector's sight, a full
        # collection no longer walks it (those were the slowest result polls).
        gc.freeze()
        log.info("api ready", database=svc.store.url.get_backend_name(), storage=storage_description(settings))
        try:
            yield
        finally:
            await retention.stop()
            app.state.metrics_registry.unregister(collector)
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await dispatcher.stop()
            await svc.waiter.stop()
            svc.store.close()

    app = FastAPI(
        title="Qwen-Image-Edit server",
        version="0.1.0",
        description="A self-hosted, drop-in replacement for the WaveSpeed v3 Qwen-Image-Edit API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.state.metrics_registry, latency = build_registry()
    app.include_router(media.router)
    app.include_router(predictions.router)
    app.include_router(ops.router)
    app.include_router(metrics_api.router)
    # Playground (static page) and the OpenAI-compatible images API: see server/api/playground.py, openai.py.
    app.include_router(openai.router)
    app.include_router(playground.router)
    playground.mount_static(app)
    # Last: it answers POSTs to model ids we do not serve, after every real route had its chance.
    app.include_router(predictions.fallback_router)
    app.add_middleware(JsonByDefault)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestTimer, histogram=latency)
    return app
