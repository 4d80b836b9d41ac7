"""Account endpoints of the hosted API, answered from this server's own data (server/api/account.py):

``GET  /api/v3/balance``          budget left (QWEN_EDIT_BUDGETS), else 0 with ``limited: false``
``POST /api/v3/model/price``      the configured price of one prediction (QWEN_EDIT_PRICES; default 0)
``POST /api/v3/model/pricing``    the same (the published CLI's path)
``POST /api/v3/billings/search``  one "deduct" record per completed prediction, at its price
``POST /api/v3/user/usage_stats`` requests, completed ones, GPU seconds and cost per day and model
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from server.api.account import CURRENCY
from server.api.auth import Caller
from server.api.deps import Services, caller, services
from server.api.routes.history import epoch_ms, scope_of
from server.api.schemas import envelope, error_responses, iso_ms
from server.api.submit import resolve_endpoint
from server.jobs.contract import Status
from server.jobs.history import DAY_MS, HistoryQuery

router = APIRouter(tags=["account"])
WEEK = timedelta(days=7)
ERRORS = error_responses(
    {
        400: ("Bad request body", "Invalid request: model_id: is required"),
        401: ("Missing or invalid API key", "Missing API key: send 'Authorization: Bearer <key>'."),
        404: ("Model not served here", "Model 'x/y' is not served here."),
    }
)


class PriceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model_id: Annotated[str, Field(min_length=1, max_length=256)]
    inputs: dict[str, Any] = Field(default_factory=dict, description="Ignored: one price per prediction.")


class BillingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    page: Annotated[int, Field(ge=1, le=100_000)] = 1
    page_size: Annotated[int, Field(ge=1, le=100)] = 20
    billing_type: Literal["deduct", "refund"] | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    model_uuid: Annotated[str | None, Field(max_length=256)] = None


class UsageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    start_time: datetime | None = Field(None, description="Default: 7 days before end_time.")
    end_time: datetime | None = Field(None, description="Default: now.")
    model_uuid: Annotated[str | None, Field(max_length=256)] = None


@router.get("/api/v3/balance", summary="Budget left for this API key", responses=ERRORS)
async def balance(svc: Services = Depends(services), who: Caller = Depends(caller)) -> dict[str, Any]:
    state = await run_in_threadpool(svc.account.balance, who)
    left = state.left
    return envelope(
        {
            "balance": 0.0 if left is None else left,
            "currency": CURRENCY,
            "limited": left is not None,  # false: no budget for this key, "balance" means nothing
            "budget": state.budget,
            "spent": state.spent,
        }
    )


@router.post("/api/v3/model/price", summary="What one prediction of a model costs here", responses=ERRORS)
@router.post("/api/v3/model/pricing", summary="What one prediction costs (the published CLI's path)", responses=ERRORS)
async def price(body: PriceRequest, svc: Services = Depends(services), _: Caller = Depends(caller)) -> dict[str, Any]:
    model = resolve_endpoint(body.model_id, svc).model
    cost = svc.account.price(model)
    return envelope(
        {
            "model_id": model,
            "unit_price": cost,
            "price": cost,
            "discounted_price": cost,
            "discount_rate": 1.0,
            "currency": CURRENCY,
        }
    )


@router.post("/api/v3/billings/search", summary="Charges: one per completed prediction", responses=ERRORS)
async def billings(
    body: BillingsRequest, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    if body.billing_type == "refund":  # failed predictions are never charged, so never refunded
        return envelope({"page": body.page, "page_size": body.page_size, "has_more": False, "items": []})
    query = HistoryQuery(
        page=body.page,
        page_size=body.page_size,
        created_after=epoch_ms(body.start_time),
        created_before=epoch_ms(body.end_time),
        model=body.model_uuid,
        statuses=(Status.COMPLETED,),
    )
    page = await run_in_threadpool(svc.store.history.page, scope_of(who), query)
    items = [
        {
            "uuid": job.id,
            "billing_type": "deduct",
            "price": svc.account.price(job.model),
            "currency": CURRENCY,
            "created_at": iso_ms(job.finished_at or job.created_at),
            "prediction": {"uuid": job.id, "model_uuid": job.model, "status": job.status.value},
        }
        for job in page.jobs
    ]
    return envelope({"page": body.page, "page_size": body.page_size, "has_more": page.has_more, "items": items})


@router.post("/api/v3/user/usage_stats", summary="Requests, GPU seconds and cost per day and model", responses=ERRORS)
async def usage_stats(
    body: UsageRequest, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    until = body.end_time or datetime.now(UTC)
    since = body.start_time or (until - WEEK if until.year > 1 else until)  # year 1 has no week before it
    start, end = epoch_ms(since) or 0, epoch_ms(until) or 0
    rows = await run_in_threadpool(svc.store.history.usage, scope_of(who), start, end, body.model_uuid)
    account = svc.account
    days: dict[int, dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    keys: dict[str | None, dict[str, Any]] = {}
    for row in rows:
        cost = account.price(row.model) * row.completed
        key = keys.setdefault(
            row.key_id, {"key_id": row.key_id, "total_cost": 0.0, "total_count": 0, "gpu_seconds": 0.0}
        )
        key["total_cost"] += cost
        key["total_count"] += row.requests
        key["gpu_seconds"] += row.gpu_ms / 1000
        day = days.setdefault(
            row.day, {"date": iso_ms(row.day * DAY_MS)[:10], "amount": 0.0, "count": 0, "gpu_seconds": 0.0}
        )
        day["amount"] += cost
        day["count"] += row.requests
        day["gpu_seconds"] += row.gpu_ms / 1000
        model = models.setdefault(
            row.model,
            {
                "model_uuid": row.model,
                "model_type": "image-to-image",
                "unit_price": account.price(row.model),
                "total_cost": 0.0,
                "total_count": 0,
                "success_count": 0,
                "gpu_seconds": 0.0,
                "last_used_date": "",
            },
        )
        model["total_cost"] += cost
        model["total_count"] += row.requests
        model["success_count"] += row.completed
        model["gpu_seconds"] += row.gpu_ms / 1000
        model["last_used_date"] = max(model["last_used_date"], iso_ms(row.day * DAY_MS)[:10])
    summary = {
        "total_cost": round(sum(m["total_cost"] for m in models.values()), 6),
        "total_requests": sum(m["total_count"] for m in models.values()),
        "success_requests": sum(m["success_count"] for m in models.values()),
        "gpu_seconds": round(sum(m["gpu_seconds"] for m in models.values()), 3),
        "currency": CURRENCY,
    }
    return envelope(
        {
            "start_time": iso_ms(start),
            "end_time": iso_ms(end),
            "per_model_usage": list(models.values()),
            "daily_usage": [days[d] for d in sorted(days)],
            "per_key_usage": list(keys.values()),  # one entry, the caller's own, unless an admin asks
            "summary": summary,
        }
    )
