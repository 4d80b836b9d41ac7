"""Liveness, readiness, Prometheus metrics and the webhook secret."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from server.api.auth import Caller
from server.api.deps import Services, caller, services
from server.api.schemas import SecretEnvelope, envelope, error_responses
from server.errors import ServiceUnavailable, StoreUnavailable
from server.jobs.contract import PRESENCE_FRESH_S, WorkerState
from server.jobs.store import now_ms

router = APIRouter()


@router.get("/livez", tags=["ops"], summary="The process is up (its pid: which of serve --api-workers N answered)")
async def livez() -> dict[str, Any]:
    return {"status": "ok", "pid": os.getpid()}


def readiness(svc: Services) -> dict[str, Any]:
    svc.store.ping()
    now = now_ms()
    # Only rows refreshed lately: a worker that died (or cannot reach the store) stops counting
    # within seconds, not when its last lease would have run out.
    workers = [
        {"id": w.id, "variant": w.variant, "state": w.state.value, "detail": w.detail}
        for w in svc.store.workers.list()
        if now - w.heartbeat_at < PRESENCE_FRESH_S * 1000 and w.state != WorkerState.STOPPED
    ]
    ready = [w for w in workers if w["state"] == WorkerState.READY]
    return {"ready": bool(ready), "workers": workers, "queued": svc.store.queued_count(), "config": config(svc)}


def config(svc: Services) -> dict[str, Any]:
    """What this deployment runs, as its settings say, for benchmark results to record (qwen-edit
    bench). Weights are named by their last path part only: /readyz needs no key."""
    s = svc.settings
    return {
        "version": __version__(),
        "variants": s.served_variants,
        "weights": {v: Path(w).name if (w := s.weights_for(v)) else "auto" for v in s.served_variants},
        "device": s.device,
        "dtype": s.dtype,
        "memory_mode": s.memory_mode,
        "quantize": s.quantize,
        "preset": s.preset,
        "default_steps": s.default_steps,
        "workers": s.embedded_workers,
        "batch_max_size": s.batch_max_size,
        "batch_wait_ms": s.batch_wait_ms,
    }


def __version__() -> str:
    try:
        return metadata.version("qwen-edit-server")
    except metadata.PackageNotFoundError:
        return "unknown"


@router.get(
    "/readyz",
    tags=["ops"],
    summary="Ready when the job store answers and a worker has its model loaded; `config`: what this server runs",
    responses=error_responses(
        {503: ("Not ready: no worker ready, or the job store away", "No worker is ready yet (none running).")}
    ),
)
async def readyz(svc: Services = Depends(services)) -> dict[str, Any]:
    try:
        state = await run_in_threadpool(readiness, svc)
    except StoreUnavailable as exc:
        raise ServiceUnavailable(f"Job store unavailable: {exc}") from exc
    if not state["ready"]:
        detail = "; ".join(f"{w['id']}: {w['state']} {w['detail']}".strip() for w in state["workers"]) or "none running"
        raise ServiceUnavailable(f"No worker is ready yet ({detail}).", retry_after_s=5)
    return {"status": "ready", **state}


@router.get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics (no API key: keep it on a private network)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/api/v3/webhook/secret", tags=["webhooks"], response_model=SecretEnvelope, summary="The webhook signing secret"
)
async def webhook_secret(svc: Services = Depends(services), _: Caller = Depends(caller)) -> dict[str, Any]:
    return envelope({"secret": svc.webhook_secret})
