"""A caller's prediction history, as the vendor's CLI, MCP server and desktop app ask for it:
``POST /api/v3/predictions`` (a page, newest first, by time range, model and status) and
``POST /api/v3/predictions/delete`` (the predictions and their files)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from server.api.auth import Caller
from server.api.deps import Services, base_url, caller, services
from server.api.schemas import envelope, error_responses
from server.api.tasks.retention import delete_file
from server.jobs.contract import Status
from server.jobs.history import HistoryQuery, Scope

log = structlog.get_logger(__name__)
router = APIRouter(tags=["history"])
ERRORS = error_responses(
    {
        400: ("Bad request body", "Invalid request: page_size: Input should be less than or equal to 100"),
        401: ("Missing or invalid API key", "Missing API key: send 'Authorization: Bearer <key>'."),
    }
)

# The hosted statuses the clients send; this server's four, with "pending" as the CLI's word for
# queued. Cancelled and timed-out predictions end "failed" here, so those filters match nothing.
StatusFilter = Literal["created", "pending", "processing", "completed", "failed", "cancelled", "timeout"]
_STATUSES: dict[str, tuple[Status, ...]] = {
    "created": (Status.CREATED,),
    "pending": (Status.CREATED,),
    "processing": (Status.PROCESSING,),
    "completed": (Status.COMPLETED,),
    "failed": (Status.FAILED,),
    "cancelled": (),
    "timeout": (),
}


class HistoryRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    page: Annotated[int, Field(ge=1, le=100_000)] = 1
    page_size: Annotated[int, Field(ge=1, le=100)] = 20
    created_after: datetime | None = Field(None, description="ISO 8601 (UTC unless a zone is given), inclusive.")
    created_before: datetime | None = Field(None, description="ISO 8601, exclusive.")
    model: Annotated[str | None, Field(max_length=256)] = None
    status: StatusFilter | None = None
    include_inputs: bool = True


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(min_length=1, max_length=1000)]


MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def epoch_ms(value: datetime | None) -> int | None:
    """Epoch milliseconds (naive times are UTC), clamped to 1970..9999: the range jobs can be in."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return min(max(int(value.timestamp() * 1000), 0), MAX_MS)


def scope_of(who: Caller) -> Scope:
    """Admins (and everyone with auth off) see every key's predictions; others their own."""
    return Scope(key_id=who.key_id, all_keys=who.admin or who.key_id is None)


@router.post("/api/v3/predictions", summary="The caller's predictions, newest first", responses=ERRORS)
async def history(
    body: HistoryRequest, request: Request, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    statuses = _STATUSES[body.status] if body.status else ()
    query = HistoryQuery(
        page=body.page,
        page_size=body.page_size,
        created_after=epoch_ms(body.created_after),
        created_before=epoch_ms(body.created_before),
        model=body.model,
        statuses=statuses,
    )
    if body.status and not statuses:  # a hosted status this server never gives
        found, has_more = [], False
    else:
        page = await run_in_threadpool(svc.store.history.page, scope_of(who), query)
        found, has_more = page.jobs, page.has_more
    base = base_url(request, svc.settings)
    # Links, never inline base64 (a page of those would be megabytes): each result still has them.
    items = [
        svc.renderer.prediction(dataclasses.replace(job, base64_output=False), base, with_input=body.include_inputs)
        for job in found
    ]
    return envelope({"page": body.page, "page_size": body.page_size, "has_more": has_more, "items": items})


@router.post("/api/v3/predictions/delete", summary="Delete predictions and their files", responses=ERRORS)
async def delete_predictions(
    body: DeleteRequest, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    def run() -> tuple[list[str], list[str]]:
        outcome = svc.store.history.delete(scope_of(who), body.ids)
        for job in outcome.deleted:
            # Outputs and the stored copies of inline inputs; uploads stay (anyone may pass them on).
            for key in {*job.outputs, *(k for k in job.params.stored_keys() if k.startswith("inputs/"))}:
                delete_file(svc.storage, key)
        return [job.id for job in outcome.deleted], outcome.in_flight

    deleted, in_flight = await run_in_threadpool(run)
    log.info("predictions deleted", count=len(deleted), kept_in_flight=len(in_flight))
    return envelope({"deleted": deleted, "in_flight": in_flight})
