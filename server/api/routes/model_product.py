"""The model catalogue as WaveSpeed's ComfyUI nodes read it, from the hosted site's second host
(``https://wavespeed.ai/center/default/api/v1/model_product/...``; vendor-host mode brings that
host here). Three calls, no key: the categories with their counts, one category's models, and one
model's detail with the request schema its widgets are drawn from (``properties``, ``required``,
``x-order-properties``, ``enum``, ``minimum``/``maximum``). A model's ``model_uuid`` is its v3 id:
the node submits to ``/api/v3/<model_uuid>``.

The entries are server/api/catalog.py's, and a detail is the v3 catalog's rendering of the entry
(routes/catalog.py) with the node's names added: one source, two shapes.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from server.api.catalog import CatalogEntry, catalog, find
from server.api.deps import Services, services
from server.api.routes.catalog import v3_model
from server.api.schemas import envelope
from server.errors import NotFound

PREFIX = "/center/default/api/v1/model_product"
router = APIRouter(prefix=PREFIX, tags=["vendor-host"], include_in_schema=False)


def _item(entry: CatalogEntry, svc: Services) -> dict[str, Any]:
    return {
        "model_uuid": entry.model_id,
        "model_id": entry.model_id,
        "model_name": entry.name,
        "description": entry.description,
        "type": entry.type,
        "base_price": svc.account.price(entry.model_id),
        "sort_order": entry.sort_order,
    }


@router.get("/type_statistics")
async def type_statistics(svc: Services = Depends(services)) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for entry in catalog(svc.settings):
        counts[entry.type] = counts.get(entry.type, 0) + 1
    return envelope([{"type": kind, "count": n} for kind, n in counts.items()])


@router.get("/search")
async def search(
    page: int = Query(1, ge=1),
    page_size: int = Query(20, ge=1, le=100),
    types: str | None = Query(None, description="comma-separated categories; none: all"),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    wanted = {t.strip() for t in types.split(",") if t.strip()} if types else None
    entries = [e for e in catalog(svc.settings) if wanted is None or e.type in wanted]
    start = (page - 1) * page_size
    items = [_item(entry, svc) for entry in entries[start : start + page_size]]
    return envelope({"items": items, "page": page, "page_size": page_size, "total": len(entries)})


@router.get("/detail/{model_uuid:path}")
async def detail(model_uuid: str, svc: Services = Depends(services)) -> dict[str, Any]:
    entry = find(svc.settings, model_uuid.strip("/"))
    if entry is None:
        raise NotFound(f"Model {model_uuid!r} is not served here. This server serves: {svc.served_models()}.")
    return envelope({**v3_model(entry, svc.account), **_item(entry, svc), "input": entry.request_schema})
