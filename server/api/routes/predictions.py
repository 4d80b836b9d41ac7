"""Submit, result and cancel: the heart of the v3 contract."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from pipelines.registry import VARIANTS, endpoints_of
from server.api.auth import Caller
from server.api.deps import Services, base_url, caller, services
from server.api.hold import hold
from server.api.schemas import EditRequest, PredictionEnvelope, envelope, error_responses
from server.api.submit import Origin, submit
from server.errors import NotFound
from server.jobs.contract import Job

log = structlog.get_logger(__name__)
router = APIRouter(tags=["predictions"])

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = error_responses(
    {
        400: ("Bad request body", "Invalid request: prompt: is required"),
        401: ("Missing or invalid API key", "Missing API key: send 'Authorization: Bearer <key>'."),
        402: ("The API key's budget is spent (QWEN_EDIT_BUDGETS)", "This API key's budget is spent (1 of 1 USD)."),
        404: ("Unknown model or prediction", "Prediction 'abc' not found."),
        413: ("Body too large", "Request body larger than 41943040 bytes."),
        429: ("Queue full (see Retry-After)", "The queue is full; retry later."),
        503: ("Job store unavailable", "The job store is unavailable; try again shortly."),
    }
)
PREDICTION_ROUTE: dict[str, Any] = {
    "response_model": PredictionEnvelope,
    "response_model_exclude_none": True,
    "responses": ERROR_RESPONSES,
}


def _make_submit_route(model: str):  # type: ignore[no-untyped-def]
    async def submit_route(
        body: EditRequest,
        request: Request,
        webhook: str | None = Query(
            None, min_length=1, max_length=4096, description="http(s) URL to POST the finished prediction to."
        ),
        svc: Services = Depends(services),
        who: Caller = Depends(caller),
    ) -> dict[str, Any]:
        origin = Origin.of(request, svc, who)
        job = await submit(svc, model, body, origin, webhook)
        if not body.enable_sync_mode:
            return envelope(await svc.renderer.render(job, origin.base))
        timeout = svc.settings.sync_timeout_s
        current = await hold(request, svc.store, [job.id], svc.waiter.outcome(job, timeout))
        data = await svc.renderer.render(current, origin.base)
        return envelope(data if current.status.terminal else svc.renderer.sync_timed_out(data, timeout))

    submit_route.__name__ = "submit_" + model.rsplit("/", 1)[-1].replace("-", "_")
    return submit_route


for _variant in VARIANTS.values():
    for _model in endpoints_of(_variant):
        router.add_api_route(
            f"/api/v3/{_model}",
            _make_submit_route(_model),
            methods=["POST"],
            summary=f"Submit a {_model} prediction",
            **PREDICTION_ROUTE,
        )


@router.get("/api/v3/predictions/{prediction_id}/result", summary="Get a prediction's result", **PREDICTION_ROUTE)
@router.get("/api/v3/predictions/{prediction_id}", summary="Get a prediction (same as /result)", **PREDICTION_ROUTE)
@router.get(
    "/api/v2/predictions/{prediction_id}/result",
    summary="Get a prediction's result (v2 path for older clients)",
    **PREDICTION_ROUTE,
)
async def get_result(
    prediction_id: str, request: Request, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    job = owned(await run_in_threadpool(svc.store.get, prediction_id), who, prediction_id)
    return envelope(await svc.renderer.render(job, base_url(request, svc.settings)))


def owned(job: Job | None, who: Caller, prediction_id: str) -> Job:
    """The caller's own prediction; another key's is as unknown as one that does not exist."""
    if job is None or not who.owns(job):
        raise NotFound(f"Prediction {prediction_id!r} not found.")
    return job


@router.post(
    "/api/v3/predictions/{prediction_id}/cancel",
    summary="Cancel a prediction: a queued one fails at once, a running one at its next step",
    **PREDICTION_ROUTE,
)
async def cancel(
    prediction_id: str, request: Request, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    owned(await run_in_threadpool(svc.store.get, prediction_id), who, prediction_id)
    job = owned(await run_in_threadpool(svc.store.cancel, prediction_id), who, prediction_id)
    log.info("prediction cancel requested", prediction_id=prediction_id, status=job.status.value)
    return envelope(await svc.renderer.render(job, base_url(request, svc.settings)))
