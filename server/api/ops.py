"""Liveness, readiness and the webhook secret."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from server.api.deps import Services, caller, services
from server.api.schemas import SecretEnvelope, envelope
from server.errors import ServiceUnavailable
from server.jobs.store import now_ms

router = APIRouter()


@router.get("/livez", tags=["ops"], summary="The process is up")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


def readiness(svc: Services) -> dict[str, Any]:
    svc.store.ping()
    stale_after = max(15_000, int(svc.settings.lease_s * 1000))
    now = now_ms()
    workers = [
        {"id": w.id, "variant": w.variant, "state": w.state, "detail": w.detail}
        for w in svc.store.list_workers()
        if now - w.heartbeat_at < stale_after and w.state != "stopped"
    ]
    ready = [w for w in workers if w["state"] == "ready"]
    return {"ready": bool(ready), "workers": workers, "queued": svc.store.queued_count()}


@router.get("/readyz", tags=["ops"], summary="Ready when the job store answers and a worker has its model loaded")
async def readyz(svc: Services = Depends(services)) -> dict[str, Any]:
    try:
        state = await run_in_threadpool(readiness, svc)
    except Exception as exc:
        raise ServiceUnavailable(f"Job store unavailable: {type(exc).__name__}") from exc
    if not state["ready"]:
        detail = "; ".join(f"{w['id']}: {w['state']} {w['detail']}".strip() for w in state["workers"]) or "none running"
        raise ServiceUnavailable(f"No worker is ready yet ({detail}).", retry_after_s=5)
    return {"status": "ready", **state}


@router.get(
    "/api/v3/webhook/secret", tags=["webhooks"], response_model=SecretEnvelope, summary="The webhook signing secret"
)
async def webhook_secret(svc: Services = Depends(services), _: str | None = Depends(caller)) -> dict[str, Any]:
    return envelope({"secret": svc.webhook_secret})
