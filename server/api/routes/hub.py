"""The one Hugging Face Hub call huggingface_hub's ``provider="wavespeed"`` makes before it calls
the provider: the model's provider mapping (``GET {HF_ENDPOINT}/api/models/<repo>?expand=...``).
Where the Hub cannot be reached (air-gapped, vendor-host mode), ``HF_ENDPOINT`` points here and this
answers it for the variants served, mapping each Hub repo to its v3 model id. No key: the Hub's
model pages are public, and this names only what the catalogue routes name too."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from pipelines.registry import VARIANTS, endpoints_of
from server.api.deps import Services, services
from server.errors import NotFound

router = APIRouter(tags=["vendor-host"], include_in_schema=False)
TASK = "image-to-image"


@router.get("/api/models/{repo_id:path}")
async def model_info(repo_id: str, svc: Services = Depends(services)) -> dict[str, Any]:
    repo = repo_id.split("/revision/", 1)[0].strip("/")
    served = {VARIANTS[name].hub_repo.lower(): VARIANTS[name] for name in svc.variants}
    variant = served.get(repo.lower())
    if variant is None:
        known = ", ".join(v.hub_repo for v in served.values())
        raise NotFound(f"Repository {repo!r} is not served here (served: {known}).")
    return {
        "id": variant.hub_repo,
        "modelId": variant.hub_repo,
        "pipeline_tag": TASK,
        "library_name": "diffusers",
        "private": False,
        "tags": [TASK, "diffusers"],
        "inferenceProviderMapping": {
            "wavespeed": {"status": "live", "providerId": endpoints_of(variant)[0], "task": TASK}
        },
    }
