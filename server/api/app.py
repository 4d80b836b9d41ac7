"""The FastAPI application: wiring only. ``create_app(settings)`` builds it; the lifespan opens the
job store (migrating it) and storage, and starts the background tasks (api/tasks/)."""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from server.api.auth import Authenticator
from server.api.bigbody import BodyHelpers, BodyOffload
from server.api.deps import Services
from server.api.handlers import install_error_handlers
from server.api.limits import RateLimiter
from server.api.middleware import BodyLimit, JsonByDefault, RequestTimer
from server.api.proxy import ProxyHeaders
from server.api.render import Renderer
from server.api.routes import (
    account,
    catalog,
    history,
    hub,
    media,
    model_product,
    openai,
    ops,
    playground,
    predictions,
)
from server.api.tasks.base import Background
from server.api.tasks.fanout import DoneFanout
from server.api.tasks.reaper import reaper_task
from server.api.tasks.retention import retention_task
from server.api.tasks.waiter import CompletionWaiter
from server.api.tasks.webhooks import WebhookDispatcher, new_secret
from server.api.telemetry import JobStoreCollector, build_registry
from server.api.uploads import UploadSigner
from server.jobs.store import JobStore
from server.media.netguard import NetGuard
from server.settings import Settings
from server.storage.factory import build_storage, storage_description

log = structlog.get_logger(__name__)


def api_keys(settings: Settings, store: JobStore) -> list[str]:
    """Configured keys; with none (and auth on), one generated key kept in the store and data_dir/api_key."""
    if settings.api_keys or settings.auth_disabled:
        return list(settings.api_keys)
    key = store.workers.meta_value("generated_api_key", lambda: "qe_" + secrets.token_urlsafe(24))
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


def build_services(settings: Settings, store: JobStore) -> Services:
    store.migrate()
    storage = build_storage(settings)
    if not settings.lora_dirs:  # the embedded default's LoRA folder: there to fill, and to check against
        (settings.data_dir / "loras").mkdir(parents=True, exist_ok=True)
    secret = settings.webhook_secret or store.workers.meta_value("webhook_secret", new_secret)
    signing_key = store.workers.meta_value("upload_signing_key", lambda: secrets.token_hex(32))
    return Services(
        settings=settings,
        store=store,
        storage=storage,
        auth=Authenticator(settings, api_keys(settings, store)),
        waiter=CompletionWaiter(store, poll_s=settings.poll_interval_s),
        upload_signer=UploadSigner(bytes.fromhex(signing_key), settings.upload_ttl_s),
        renderer=Renderer(storage, settings),
        webhook_secret=secret,
        variants=settings.served_variants,
        rate_limiter=RateLimiter(settings.rate_limit_per_minute),
    )


def app_from_env() -> FastAPI:
    """The app of one of ``serve --api-workers N``'s processes (spawned by uvicorn: nothing of the
    parent's set-up is inherited but the environment): settings and logging from it."""
    from server.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = JobStore.open(settings)
        svc = await run_in_threadpool(build_services, settings, store)
        app.state.services = svc
        app.state.body_helpers = BodyHelpers(settings)
        dispatcher = WebhookDispatcher(
            store,
            svc.renderer,
            svc.webhook_secret,
            max_attempts=settings.webhook_max_attempts,
            timeout_s=settings.webhook_timeout_s,
            poll_s=settings.poll_interval_s,
            first_retry_s=settings.webhook_first_retry_s,
            guard=NetGuard.from_entries(settings.fetch_allow),
        )
        fanout = DoneFanout(store.notifier)
        fanout.subscribe(svc.waiter.heard)
        fanout.subscribe(dispatcher.wake, webhooks_only=True)
        collector = JobStoreCollector(store)
        app.state.metrics_registry.register(collector)
        tasks: list[Background] = [svc.waiter, dispatcher, reaper_task(store, max(1.0, settings.lease_s / 4))]
        retention = retention_task(
            store, svc.storage, settings.retention_s, settings.retention_interval_s, settings.upload_ttl_s
        )
        if retention is not None:
            tasks.append(retention)
        for task in tasks:  # before the fan-out: a consumer is running when the first news comes
            task.start()
        await fanout.start()
        # Everything built so far lives as long as the process: out of the collector's sight, a full
        # collection no longer walks it (those were the slowest result polls).
        gc.freeze()
        log.info("api ready", database=store.db.backend, storage=storage_description(settings))
        try:
            yield
        finally:
            for task in reversed(tasks):
                await task.stop()
            app.state.metrics_registry.unregister(collector)
            await fanout.stop()
            app.state.body_helpers.close()
            store.close()

    app = FastAPI(
        title="Qwen-Image-Edit server",
        version="0.1.0",
        description="A self-hosted, drop-in replacement for the WaveSpeed v3 Qwen-Image-Edit API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.state.metrics_registry, latency = build_registry()
    app.include_router(media.router)
    app.include_router(history.router)  # before predictions: POST /api/v3/predictions is no model id
    app.include_router(predictions.router)
    app.include_router(catalog.router)
    app.include_router(account.router)
    app.include_router(ops.router)
    # Playground (static page) and the OpenAI-compatible images API: see routes/playground.py, openai.py.
    app.include_router(openai.router)
    app.include_router(playground.router)
    # Vendor-host mode: huggingface_hub's provider mapping, the ComfyUI nodes' catalogue.
    app.include_router(hub.router)
    app.include_router(model_product.router)
    playground.mount_static(app)
    app.add_middleware(BodyOffload, threshold=settings.body_offload_bytes)
    app.add_middleware(JsonByDefault)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestTimer, histogram=latency)
    app.add_middleware(
        ProxyHeaders, trusted=settings.forwarded_allow_ips
    )  # outermost: the rest sees the original request
    return app
