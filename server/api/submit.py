"""Submission in named steps, shared by the v3 routes and the OpenAI-compatible door:

1. endpoint   the model id names a family member this server serves
2. rate       the caller's per-minute allowance (this API process)
3. request    what the body alone can refuse: prompt, webhook, LoRAs on the right endpoint
4. images     each image string becomes an ImageRef (inline bytes checked and stored now)
5. params     the typed JobParams: defaults, allowed overrides, the seed drawn
6. echo       what the client sent, inline bytes replaced by links to the stored copies
7. admit      one row, inserted atomically with the queue cap, the per-key cap and the key's budget
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from pipelines import geometry
from pipelines.errors import PipelineInputError
from pipelines.registry import Endpoint, endpoint_for, endpoints_of
from server.api import seeds
from server.api.account import over_budget
from server.api.auth import Caller
from server.api.bigbody import PreparedRequest
from server.api.deps import Services, base_url
from server.api.limits import queue_full, too_many_in_flight
from server.api.schemas import EditRequest, parse_size
from server.errors import BadRequest, NotFound
from server.jobs.contract import ImageRef, Job, JobParams, LoraRef, Status
from server.jobs.store import Admission, KeyAtLimit, OverBudget, QueueFull, new_id, now_ms
from server.media.images import ImageLimits
from server.media.loras import check_at_submit as check_loras
from server.media.netguard import BlockedDestination, NetGuard
from server.media.references import MAX_URL_CHARS, to_reference

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Origin:
    """Where the request came from and how its client reaches us."""

    base: str  # the base URL of the links we hand out
    own_origins: frozenset[str]  # scheme://host[:port] of this server, to recognise its own links
    caller: Caller
    # A big body's inline images, already stored by a helper process (server/api/bigbody.py).
    prepared: PreparedRequest | None = field(default=None, compare=False)

    @classmethod
    def of(cls, request: Request, svc: Services, caller: Caller) -> Origin:
        return cls(
            base_url(request, svc.settings), frozenset(svc.own_origins(request)), caller, PreparedRequest.of(request)
        )


async def submit(svc: Services, model: str, body: EditRequest, origin: Origin, webhook: str | None = None) -> Job:
    """Validate, build and store one job."""
    endpoint = resolve_endpoint(model, svc)
    svc.rate_limiter.check(origin.caller.key_id)
    # One trip to a worker thread for the rest: image decoding and storing, then the row.
    job = await run_in_threadpool(_admit, svc, endpoint, body, origin, webhook)
    log.info("prediction created", prediction_id=job.id, model=job.model, sync=body.enable_sync_mode)
    return job


def resolve_endpoint(model: str, svc: Services) -> Endpoint:
    endpoint = endpoint_for(model)
    if endpoint is None:
        raise NotFound(
            f"Model {model!r} is not served here. This server serves Qwen-Image-Edit: {svc.served_models()}."
        )
    if endpoint.variant.name not in svc.variants:
        raise NotFound(
            f"Model {model!r} is not enabled on this server (its weights are not configured). "
            f"Served: {svc.served_models()}."
        )
    return endpoint


def unknown_path_message(request: Request) -> str:
    """What a 404 says: a POST under /api/v3/ names a model id, so say which ones are served."""
    path = request.url.path
    if request.method == "POST" and path.startswith("/api/v3/"):
        svc: Services = request.app.state.services
        svc.auth(request)  # an unknown model is told to callers with a key only
        model = path.removeprefix("/api/v3/")
        return f"Model {model!r} is not served here. This server serves Qwen-Image-Edit: {svc.served_models()}."
    return "Not found."


def refuse_destination(guard: NetGuard, url: str, field: str) -> None:
    """Submit-time SSRF check (no DNS: literal addresses, schemes); the fetch itself checks again."""
    if len(url) > MAX_URL_CHARS:
        raise BadRequest(f"{field} URL is longer than {MAX_URL_CHARS} characters")
    try:
        guard.check_url(url)
    except BlockedDestination as exc:
        raise BadRequest(f"{field}: {exc}") from exc
    except ValueError as exc:  # unparsable URL (bad port, brackets...)
        raise BadRequest(f"{field} is not a valid URL: {exc}") from exc


def _admit(svc: Services, endpoint: Endpoint, body: EditRequest, origin: Origin, webhook: str | None) -> Job:
    settings = svc.settings
    guard = NetGuard.from_entries(settings.fetch_allow)
    check_request(body, endpoint, svc, guard, webhook)
    # A prepared body's images are stored under the id chosen for it; one body makes one job (the
    # OpenAI door's n > 1 takes multipart, never a prepared body).
    job_id = origin.prepared.job_id if origin.prepared is not None and not origin.prepared.taken else new_id()
    refs = image_refs(body, endpoint, job_id, svc, origin, guard)
    params = job_params(body, refs, svc)
    now = now_ms()
    job = Job(
        id=job_id,
        model=endpoint.model,
        variant=endpoint.variant.name,
        status=Status.CREATED,
        input=echo_input(body, endpoint, refs, origin.base),
        params=params,
        base_url=origin.base,
        output_format=body.output_format,
        base64_output=body.enable_base64_output,
        seed=params.seed,
        max_attempts=settings.max_attempts,
        created_at=now,
        updated_at=now,
        webhook_url=webhook,
        api_key_id=origin.caller.key_id,
        batch_key=params.batch_key(endpoint.variant),
    )
    try:
        budget = svc.account.admission_budget(origin.caller)
        svc.store.create(job, Admission(queue_cap=settings.queue_cap, per_key=settings.max_jobs_per_key, budget=budget))
    except (QueueFull, KeyAtLimit, OverBudget) as exc:
        for key in params.stored_keys():  # the inline images stored in step 4 belong to no job now
            if key.startswith("inputs/"):
                svc.storage.delete(key)
        if isinstance(exc, OverBudget):
            raise over_budget(exc) from exc
        raise queue_full() if isinstance(exc, QueueFull) else too_many_in_flight(settings.max_jobs_per_key) from exc
    if origin.prepared is not None:  # what the job holds stays; the rest goes when the response has
        origin.prepared.taken.update(params.stored_keys())
    return job


def check_request(body: EditRequest, endpoint: Endpoint, svc: Services, guard: NetGuard, webhook: str | None) -> None:
    settings = svc.settings
    if len(body.prompt) > settings.max_prompt_chars:
        raise BadRequest(f"prompt is longer than {settings.max_prompt_chars} characters")
    if body.enable_base64_output and webhook:
        raise BadRequest("enable_base64_output cannot be combined with a webhook")
    if webhook is not None:
        if not webhook.lower().startswith(("http://", "https://")):
            raise BadRequest("webhook must be an http(s) URL")
        refuse_destination(guard, webhook, "webhook")
    if body.loras and not endpoint.loras:
        raise BadRequest(f"loras are only accepted by the -lora endpoints (e.g. {endpoints_of(endpoint.variant)[1]})")
    check_loras([LoraRef(lora.path, lora.scale) for lora in body.loras or []], settings, guard)


def image_refs(
    body: EditRequest, endpoint: Endpoint, job_id: str, svc: Services, origin: Origin, guard: NetGuard
) -> tuple[ImageRef, ...]:
    """``image`` for Edit; ``images`` (or ``image``) for Plus and 2511."""
    variant = endpoint.variant
    if variant.multi_image:
        raw = list(body.images or []) or ([body.image] if body.image else [])
        field = "images"
    else:
        raw = [body.image] if body.image else []
        field = "image"
    if not raw:
        raise BadRequest(f"{field} is required")
    if len(raw) > variant.max_images:
        raise BadRequest(f"{field} takes at most {variant.max_images} images, got {len(raw)}")
    limits = ImageLimits(svc.settings.max_image_bytes, svc.settings.max_image_pixels)
    width, height = parse_size(body.size) if body.size else (None, None)

    def may_read(key: str) -> bool:
        """Uploads are anyone's to pass on (like the hosted CDN's links); an output only its
        prediction's owner's; stored copies of inputs nobody's."""
        if key.startswith("uploads/"):
            return True
        if not key.startswith("outputs/"):
            return False
        job = svc.store.get(key.split("/")[1])
        return job is not None and origin.caller.owns(job) and key in job.outputs

    refs: list[ImageRef] = []
    try:
        for i, value in enumerate(raw):
            ref, size = to_reference(
                value,
                field=field,
                job_id=job_id,
                index=i,
                storage=svc.storage,
                own_origins=set(origin.own_origins),
                limits=limits,
                may_read=may_read,
                prepared=origin.prepared.images if origin.prepared is not None else None,
            )
            refs.append(ref)
            if ref.url is not None:
                refuse_destination(guard, ref.url, field)
            if size is not None:  # bytes at hand: what the pipeline could not resize is refused now
                try:
                    geometry.check_images(variant, [size], width, height)
                except PipelineInputError as exc:
                    raise BadRequest(f"{field}: {exc}") from exc
    except BadRequest:
        for ref in refs:  # the inline images stored so far belong to no job
            if ref.key is not None and ref.key.startswith("inputs/"):
                svc.storage.delete(ref.key)
        raise
    return tuple(refs)


def job_params(body: EditRequest, refs: tuple[ImageRef, ...], svc: Services) -> JobParams:
    settings = svc.settings
    overrides = settings.allow_overrides
    steps = body.num_inference_steps if overrides and body.num_inference_steps else settings.default_steps
    if steps > settings.max_steps:
        raise BadRequest(f"num_inference_steps must be at most {settings.max_steps}")
    width, height = parse_size(body.size) if body.size else (None, None)
    return JobParams(
        prompt=body.prompt,
        images=refs,
        seed=seeds.resolve(body.seed),
        num_inference_steps=steps,
        true_cfg_scale=body.true_cfg_scale if overrides and body.true_cfg_scale else settings.default_true_cfg_scale,
        negative_prompt=body.negative_prompt
        if overrides and body.negative_prompt is not None
        else settings.default_negative_prompt,
        width=width,
        height=height,
        loras=tuple(LoraRef(path=lora.path, scale=lora.scale) for lora in body.loras or []),
    )


def echo_input(body: EditRequest, endpoint: Endpoint, refs: tuple[ImageRef, ...], base: str) -> dict[str, Any]:
    """What the client sent, with inline image bytes replaced by links to our stored copy."""
    echoed = body.model_dump(exclude_none=True, exclude_defaults=False)
    links = [f"{base}/files/{ref.key}" if ref.key is not None else str(ref.url) for ref in refs]
    if endpoint.variant.multi_image and body.images:
        echoed["images"] = links
    else:
        echoed["image"] = links[0]
    return echoed
