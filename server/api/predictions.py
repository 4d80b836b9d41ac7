"""Submit, result and cancel: the heart of the v3 contract."""

from __future__ import annotations

import base64
import random
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from pipelines.registry import VARIANTS, Endpoint, endpoint_for, endpoints_of
from server.api.deps import Services, base_url, caller, services
from server.api.examples import error_responses
from server.api.schemas import EditRequest, PredictionEnvelope, envelope, iso_ms, parse_size
from server.batching import batch_key
from server.errors import TIMEOUT, BadRequest, NotFound, TooManyRequests
from server.inputs import ImageLimits, to_reference
from server.jobs.models import Job, Status
from server.jobs.store import new_id, now_ms
from server.netguard import BlockedDestination, NetGuard
from server.ratelimit import check_concurrency
from server.storage_factory import file_url

log = structlog.get_logger(__name__)
router = APIRouter(tags=["predictions"])
# Included after every other router: it answers POSTs to model ids we do not serve.
fallback_router = APIRouter()

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = error_responses(
    {
        400: ("Bad request body", "Invalid request: prompt: is required"),
        401: ("Missing or invalid API key", "Missing API key: send 'Authorization: Bearer <key>'."),
        404: ("Unknown model or prediction", "Prediction 'abc' not found."),
        413: ("Body too large", "Request body larger than 41943040 bytes."),
        429: ("Queue full (see Retry-After)", "The queue is full; retry later."),
        503: ("Job store unavailable", "The job store is unavailable; try again shortly."),
    }
)


def prediction_data(job: Job, svc: Services, base: str, *, with_input: bool = False) -> dict[str, Any]:
    """The ``data`` object of a prediction (and, bare, the webhook body)."""
    if job.status == Status.COMPLETED:
        if job.base64_output:
            outputs = [base64.b64encode(svc.storage.get(key)).decode() for key in job.outputs]
        else:
            outputs = [file_url(svc.storage, svc.settings, base, key) for key in job.outputs]
    else:
        outputs = []
    data: dict[str, Any] = {
        "id": job.id,
        "model": job.model,
    }
    if with_input:
        data["input"] = job.input
    data.update(
        {
            "outputs": outputs,
            "urls": {"get": f"{base}/api/v3/predictions/{job.id}/result"},
            "has_nsfw_contents": [False] * len(outputs),
            "status": job.status.value,
            "created_at": iso_ms(job.created_at),
            "error": job.error or "",
            "timings": {"inference": int(job.inference_ms)},
        }
    )
    if job.status == Status.FAILED:
        data["code"] = job.error_code or 5000
    if job.progress_total:
        data["progress"] = {"step": job.progress_step, "total": job.progress_total}
    return data


async def render(job: Job, svc: Services, base: str) -> dict[str, Any]:
    """``prediction_data`` from the event loop: in a worker thread only where it does I/O (inline
    base64 outputs read from storage, presigned links from the object store)."""
    if job.status == Status.COMPLETED and (job.base64_output or svc.settings.storage_presign):
        return await run_in_threadpool(prediction_data, job, svc, base)
    return prediction_data(job, svc, base)


def _resolve_endpoint(model: str, svc: Services) -> Endpoint:
    endpoint = endpoint_for(model)
    if endpoint is None:
        raise NotFound(
            f"Model {model!r} is not served here. This server serves Qwen-Image-Edit: {svc.served_models()}."
        )
    if endpoint.variant.name not in svc.settings_variants():
        raise NotFound(
            f"Model {model!r} is not enabled on this server (its weights are not configured). "
            f"Served: {svc.served_models()}."
        )
    return endpoint


def refuse_destination(guard: NetGuard, url: str, field: str) -> None:
    """Submit-time SSRF check (no DNS: literal addresses, schemes); the fetch itself checks again."""
    if len(url) > 4096:
        raise BadRequest(f"{field} URL is longer than 4096 characters")
    try:
        guard.check_url(url)
    except BlockedDestination as exc:
        raise BadRequest(f"{field}: {exc}") from exc
    except ValueError as exc:  # unparsable URL (bad port, brackets...)
        raise BadRequest(f"{field} is not a valid URL: {exc}") from exc


def _build_job(
    body: EditRequest, endpoint: Endpoint, request: Request, svc: Services, key_id: str | None, webhook: str | None
) -> Job:
    settings = svc.settings
    variant = endpoint.variant
    if len(body.prompt) > settings.max_prompt_chars:
        raise BadRequest(f"prompt is longer than {settings.max_prompt_chars} characters")
    if body.enable_base64_output and webhook:
        raise BadRequest("enable_base64_output cannot be combined with a webhook")
    if webhook is not None and not webhook.lower().startswith(("http://", "https://")):
        raise BadRequest("webhook must be an http(s) URL")
    guard = NetGuard.from_entries(settings.fetch_allow)
    if webhook is not None:
        refuse_destination(guard, webhook, "webhook")
    if body.loras and not endpoint.loras:
        raise BadRequest(f"loras are only accepted by the -lora endpoints (e.g. {endpoints_of(variant)[1]})")

    # Which images: `image` for Edit; `images` (or `image`) for Plus and 2511.
    if variant.multi_image:
        raw_images = list(body.images or []) or ([body.image] if body.image else [])
        field = "images"
    else:
        raw_images = [body.image] if body.image else []
        field = "image"
    if not raw_images:
        raise BadRequest(f"{field} is required")
    if len(raw_images) > variant.max_images:
        raise BadRequest(f"{field} takes at most {variant.max_images} images, got {len(raw_images)}")

    job_id = new_id()
    base = base_url(request, settings)
    limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
    refs = [
        to_reference(
            value,
            field=field if variant.multi_image else "image",
            job_id=job_id,
            index=i,
            storage=svc.storage,
            own_origins=svc.own_origins(request),
            limits=limits,
        )
        for i, value in enumerate(raw_images)
    ]
    for ref in refs:
        if "url" in ref:
            refuse_destination(guard, ref["url"], field)

    overrides = settings.allow_overrides
    steps = body.num_inference_steps if overrides and body.num_inference_steps else settings.default_steps
    if steps > settings.max_steps:
        raise BadRequest(f"num_inference_steps must be at most {settings.max_steps}")
    seed = body.seed if body.seed >= 0 else random.SystemRandom().randint(0, 2147483647)
    width, height = parse_size(body.size) if body.size else (None, None)
    params: dict[str, Any] = {
        "prompt": body.prompt,
        "images": refs,
        "width": width,
        "height": height,
        "seed": seed,
        "num_inference_steps": steps,
        "true_cfg_scale": body.true_cfg_scale if overrides and body.true_cfg_scale else settings.default_true_cfg_scale,
        "negative_prompt": body.negative_prompt
        if overrides and body.negative_prompt is not None
        else settings.default_negative_prompt,
        "loras": [lora.model_dump() for lora in body.loras or []],
    }
    # Echo what the client sent, with inline image bytes replaced by links to our stored copy.
    echoed = body.model_dump(exclude_none=True, exclude_defaults=False)
    links = [f"{base}/files/{ref['key']}" if "key" in ref else ref["url"] for ref in refs]
    if variant.multi_image and body.images:
        echoed["images"] = links
    else:
        echoed["image"] = links[0]
    now = now_ms()
    return Job(
        id=job_id,
        model=endpoint.model,
        variant=variant.name,
        status=Status.CREATED,
        input=echoed,
        params=params,
        base_url=base,
        output_format=body.output_format,
        base64_output=body.enable_base64_output,
        seed=seed,
        max_attempts=settings.max_attempts,
        created_at=now,
        updated_at=now,
        webhook_url=webhook,
        api_key_id=key_id,
        batch_key=batch_key(variant, params),
    )


async def create_job(
    model: str, body: EditRequest, request: Request, svc: Services, key_id: str | None, webhook: str | None = None
) -> Job:
    """Validate, build and store one job: what every front door (v3, OpenAI-compatible) shares."""
    endpoint = _resolve_endpoint(model, svc)
    svc.rate_limiter.check(key_id)

    def admit() -> Job:
        # One trip to a worker thread for the whole admission: the cheap checks first, then the
        # image decoding and storing, then the row.
        check_concurrency(svc.store, key_id, svc.settings.max_jobs_per_key)
        if svc.store.queued_count() >= svc.settings.queue_cap:
            raise TooManyRequests("The queue is full; retry later.", retry_after_s=5)
        job = _build_job(body, endpoint, request, svc, key_id, webhook)
        svc.store.create(job)
        return job

    job = await run_in_threadpool(admit)
    log.info("prediction created", prediction_id=job.id, model=job.model, sync=body.enable_sync_mode)
    return job


async def _submit(
    model: str, body: EditRequest, request: Request, webhook: str | None, svc: Services, key_id: str | None
):
    job = await create_job(model, body, request, svc, key_id, webhook)

    base = base_url(request, svc.settings)
    if body.enable_sync_mode:
        timeout = svc.settings.sync_timeout_s
        finished = await svc.waiter.wait(job.id, timeout)
        current = await run_in_threadpool(svc.store.get, job.id)
        assert current is not None
        if not finished or not current.status.terminal:
            data = await render(current, svc, base)
            data.update(
                status=Status.PROCESSING.value,
                code=TIMEOUT,
                error=f"Sync mode timed out after {timeout:g} seconds. "
                "The prediction is still processing asynchronously.",
            )
            return envelope(data)
        return envelope(await render(current, svc, base))
    return envelope(await render(job, svc, base))


def _make_submit_route(model: str):  # type: ignore[no-untyped-def]
    async def submit(
        body: EditRequest,
        request: Request,
        webhook: str | None = Query(None, description="URL to POST the finished prediction to."),
        svc: Services = Depends(services),
        key_id: str | None = Depends(caller),
    ) -> dict[str, Any]:
        return await _submit(model, body, request, webhook, svc, key_id)

    submit.__name__ = "submit_" + model.rsplit("/", 1)[-1].replace("-", "_")
    return submit


for _variant in VARIANTS.values():
    for _model in endpoints_of(_variant):
        router.add_api_route(
            f"/api/v3/{_model}",
            _make_submit_route(_model),
            methods=["POST"],
            response_model=PredictionEnvelope,
            response_model_exclude_none=True,
            summary=f"Submit a {_model} prediction",
            responses=ERROR_RESPONSES,
        )


@fallback_router.post("/api/v3/{model:path}", include_in_schema=False)
async def submit_unknown(model: str, svc: Services = Depends(services), _: str | None = Depends(caller)) -> None:
    _resolve_endpoint(model, svc)
    raise NotFound(f"Model {model!r} is not served here.")


async def _result(prediction_id: str, request: Request, svc: Services) -> dict[str, Any]:
    job = await run_in_threadpool(svc.store.get, prediction_id)
    if job is None:
        raise NotFound(f"Prediction {prediction_id!r} not found.")
    return envelope(await render(job, svc, base_url(request, svc.settings)))


@router.get(
    "/api/v3/predictions/{prediction_id}/result",
    response_model=PredictionEnvelope,
    response_model_exclude_none=True,
    summary="Get a prediction's result",
    responses=ERROR_RESPONSES,
)
async def get_result(
    prediction_id: str, request: Request, svc: Services = Depends(services), _: str | None = Depends(caller)
) -> dict[str, Any]:
    return await _result(prediction_id, request, svc)


@router.get(
    "/api/v3/predictions/{prediction_id}",
    response_model=PredictionEnvelope,
    response_model_exclude_none=True,
    summary="Get a prediction (same as /result)",
    responses=ERROR_RESPONSES,
)
async def get_prediction(
    prediction_id: str, request: Request, svc: Services = Depends(services), _: str | None = Depends(caller)
) -> dict[str, Any]:
    return await _result(prediction_id, request, svc)


@router.get(
    "/api/v2/predictions/{prediction_id}/result",
    response_model=PredictionEnvelope,
    response_model_exclude_none=True,
    summary="Get a prediction's result (v2 path for older clients)",
    responses=ERROR_RESPONSES,
)
async def get_result_v2(
    prediction_id: str, request: Request, svc: Services = Depends(services), _: str | None = Depends(caller)
) -> dict[str, Any]:
    return await _result(prediction_id, request, svc)


@router.post(
    "/api/v3/predictions/{prediction_id}/cancel",
    response_model=PredictionEnvelope,
    response_model_exclude_none=True,
    summary="Cancel a prediction: a queued one fails at once, a running one at its next step",
    responses=ERROR_RESPONSES,
)
async def cancel(
    prediction_id: str, request: Request, svc: Services = Depends(services), _: str | None = Depends(caller)
) -> dict[str, Any]:
    job = await run_in_threadpool(svc.store.cancel, prediction_id)
    if job is None:
        raise NotFound(f"Prediction {prediction_id!r} not found.")
    log.info("prediction cancel requested", prediction_id=prediction_id, status=job.status.value)
    return envelope(await render(job, svc, base_url(request, svc.settings)))
