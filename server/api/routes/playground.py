"""The Playground: a static page (server/static/) at ``/`` and ``/playground``, and the little it
needs to know about this server before the user has typed a key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from pipelines.registry import endpoints_of, get_variant
from server.api.deps import Services, services
from server.api.schemas import MAX_SIDE, MIN_SIDE

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"  # server/api/static
router = APIRouter(tags=["playground"])


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/playground/config", summary="What the Playground offers on this server (no API key)")
async def playground_config(svc: Services = Depends(services)) -> dict[str, Any]:
    models = [m for v in svc.variants for m in endpoints_of(get_variant(v))]
    return {
        "models": [m for m in models if not m.endswith("-lora")],
        "lora_models": [m for m in models if m.endswith("-lora")],
        "multi_image": {m: get_variant(v).multi_image for v in svc.variants for m in endpoints_of(get_variant(v))},
        "allow_overrides": svc.settings.allow_overrides,
        "default_steps": svc.settings.default_steps,
        "max_steps": svc.settings.max_steps,
        "default_true_cfg_scale": svc.settings.default_true_cfg_scale,
        "size_range": [MIN_SIDE, MAX_SIDE],
    }


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
