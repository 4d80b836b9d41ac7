"""The model catalog as the vendor's clients read it: ``GET /api/v3/models`` (the CLI's ``models`` and
``schema``, the MCP server's ``list_models`` and ``get_model_schema``, the desktop app) and one model
by id. The entries come from server/api/catalog.py; this module only renders their v3 shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from server.api.account import Account
from server.api.auth import Caller
from server.api.catalog import CatalogEntry, catalog, find
from server.api.deps import Services, caller, services
from server.api.schemas import envelope, error_responses
from server.errors import NotFound

router = APIRouter(tags=["catalog"])
ERRORS = error_responses(
    {
        401: ("Missing or invalid API key", "Missing API key: send 'Authorization: Bearer <key>'."),
        404: ("Model not served here", "Model 'x/y' is not served here."),
    }
)


def v3_model(entry: CatalogEntry, account: Account) -> dict[str, Any]:
    """One model in the hosted catalog's shape (``api_schema.api_schemas[0].request_schema``)."""
    price = account.price(entry.model_id)
    return {
        "model_id": entry.model_id,
        "name": entry.name,
        "description": entry.description,
        "type": entry.type,
        "base_price": price,
        "formula": "base_price * 1",  # one charge per prediction, whatever the inputs
        "sort_order": entry.sort_order,
        "api_schema": {
            "api_schemas": [
                {
                    "type": "model_run",
                    "method": "POST",
                    "api_path": f"/api/v3/{entry.model_id}",
                    "request_schema": entry.request_schema,
                }
            ]
        },
    }


@router.get("/api/v3/models", summary="Every model this server serves, with its request schema", responses=ERRORS)
async def list_models(svc: Services = Depends(services), _: Caller = Depends(caller)) -> dict[str, Any]:
    return envelope([v3_model(entry, svc.account) for entry in catalog(svc.settings)])


@router.get("/api/v3/models/{model_id:path}", summary="One served model, with its request schema", responses=ERRORS)
async def get_model(model_id: str, svc: Services = Depends(services), _: Caller = Depends(caller)) -> dict[str, Any]:
    entry = find(svc.settings, model_id)
    if entry is None:
        raise NotFound(f"Model {model_id!r} is not served here. This server serves: {svc.served_models()}.")
    return envelope(v3_model(entry, svc.account))
