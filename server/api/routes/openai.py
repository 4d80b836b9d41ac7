"""OpenAI-compatible ``POST /v1/images/edits``: the same jobs as the v3 routes, answered synchronously
in OpenAI's shape, so that the ``openai`` SDKs (and tools built on them) can point at this server.

Mapping:
- ``image`` (one file, or several as ``image``/``image[]``) → ``image`` (Edit) or ``images`` (Plus, 2511).
- ``size`` ``"WxH"`` → ``"W*H"``; ``"auto"`` or absent → follow the input image.
- ``n`` (1..10) → n jobs with seeds ``seed, seed+1, …`` (``seed`` is an extension field; random when absent
  or -1, reduced like v3 seeds; each item of ``data`` says the seed it ran with).
- ``model``: a served ``wavespeed-ai/qwen-image/...`` id is used as is; any other name (``gpt-image-1``,
  ``dall-e-2``) means this server's default endpoint.
- ``output_format`` png (OpenAI's default) | jpeg | webp; ``response_format`` url | b64_json.
- ``mask``, ``quality``, ``background``, ``user``, ``input_fidelity`` are accepted and ignored.
- Extensions: ``negative_prompt``, ``num_inference_steps``, ``true_cfg_scale``, ``seed``.
Errors leave as ``{"error": {"message", "type", "code", "param"}}`` (see api/errors.py).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from pipelines.registry import endpoint_for, endpoints_of, get_variant
from server.api import seeds
from server.api.auth import Caller
from server.api.deps import Services, caller, services
from server.api.handlers import OPENAI_PREFIX
from server.api.hold import hold
from server.api.schemas import EditRequest
from server.api.submit import Origin, submit
from server.errors import ApiError, BadRequest, PayloadTooLarge, blames_client
from server.jobs.contract import Job, Status

log = structlog.get_logger(__name__)
router = APIRouter(tags=["openai"])

MAX_N = 10
_OUTPUT_FORMATS = {"png", "jpeg", "webp"}
_EXAMPLE = {"created": 1764000000, "data": [{"url": "http://localhost:8000/files/outputs/abc/0.png"}]}


class GatewayTimeout(ApiError):
    status_code = 504


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, UploadFile):
        return None
    return value.strip() or None


def _int(form: FormData, name: str, default: int) -> int:
    value = _text(form, name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {value!r}") from None


def _size(value: str | None) -> str | None:
    if value is None or value.lower() == "auto":
        return None
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise BadRequest(f"size must be 'auto' or look like '1024x1024', got {value!r}")
    return f"{width}*{height}"


def _model(requested: str | None, svc: Services) -> str:
    if requested and endpoint_for(requested) is not None:
        return requested  # submit says 404 when that family member is not served here
    return endpoints_of(get_variant(svc.variants[0]))[0]


async def _images(form: FormData, max_bytes: int) -> list[str]:
    files = [f for name in ("image", "image[]") for f in form.getlist(name) if isinstance(f, UploadFile)]
    if not files:
        raise BadRequest("image is required: send one or more image files as multipart field 'image'")
    uris = []
    for f in files:
        data = await f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"{f.filename or 'image'} is larger than {max_bytes} bytes.")
        mime = f.content_type if (f.content_type or "").startswith("image/") else "image/png"
        uris.append(f"data:{mime};base64,{base64.b64encode(data).decode()}")
    return uris


def _edit_request(form: FormData, images: list[str], model: str, seed: int, output_format: str) -> EditRequest:
    endpoint = endpoint_for(model)
    multi = endpoint is not None and endpoint.variant.multi_image
    extras = {k: _text(form, k) for k in ("negative_prompt", "num_inference_steps", "true_cfg_scale")}
    fields: dict[str, Any] = {
        "prompt": _text(form, "prompt") or "",
        "size": _size(_text(form, "size")),
        "seed": seed,
        "output_format": output_format,
        **{k: v for k, v in extras.items() if v is not None},
    }
    if multi:
        fields["images"] = images
    elif len(images) > 1:
        raise BadRequest(f"{model} edits one image; send one 'image' file (or use an edit-plus model)")
    else:
        fields["image"] = images[0]
    try:
        return EditRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        msg = "is required" if first["type"] == "missing" else str(first["msg"]).removeprefix("Value error, ")
        raise BadRequest(f"{where}: {msg}") from None


# Both OpenAI SDKs retry a 5xx twice unless told not to: once a job exists, a retry would submit
# a second (and a third) job while the first goes on, so every answer about an accepted job says no.
NO_RETRY = {"x-should-retry": "false"}


async def _finish(job: Job, svc: Services) -> Job:
    timeout = svc.settings.sync_timeout_s
    current = await svc.waiter.outcome(job, timeout)
    if not current.status.terminal:
        raise GatewayTimeout(
            f"The edit did not finish within {timeout:g} seconds; it goes on as prediction {job.id} "
            f"(GET /api/v3/predictions/{job.id}/result).",
            headers=NO_RETRY,
        )
    if current.status != Status.COMPLETED:
        message = f"Prediction {job.id} {current.status.value}: {current.error or 'the edit failed.'}"
        error = BadRequest if blames_client(current.error_code or 0) else ApiError
        raise error(message, headers=NO_RETRY)
    return current


@router.post(
    OPENAI_PREFIX + "images/edits",
    summary="OpenAI-compatible image edit (synchronous)",
    description=__doc__,
    responses={
        200: {"description": "The edited images", "content": {"application/json": {"example": _EXAMPLE}}},
        400: {
            "description": "Bad request",
            "content": {
                "application/json": {
                    "example": {
                        "error": {
                            "message": "prompt: is required",
                            "type": "invalid_request_error",
                            "code": "invalid_request",
                            "param": None,
                        }
                    }
                }
            },
        },
        401: {"description": "Missing or invalid API key (OpenAI error shape)"},
        504: {"description": "Not finished within the sync timeout (the job goes on)"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image", "prompt"],
                        "properties": {
                            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "prompt": {"type": "string", "example": "Turn the sky into a sunset"},
                            "n": {"type": "integer", "default": 1, "minimum": 1, "maximum": MAX_N},
                            "size": {"type": "string", "default": "auto", "example": "1024x1024"},
                            "response_format": {"type": "string", "enum": ["url", "b64_json"], "default": "url"},
                            "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"], "default": "png"},
                            "model": {"type": "string", "example": "wavespeed-ai/qwen-image/edit"},
                            "seed": {"type": "integer", "example": 42},
                            "negative_prompt": {"type": "string"},
                            "num_inference_steps": {"type": "integer"},
                            "true_cfg_scale": {"type": "number"},
                        },
                    }
                }
            },
        }
    },
)
async def images_edits(
    request: Request, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    try:
        form = await request.form()
    except Exception as exc:  # not multipart, or a broken body
        raise BadRequest(f"Send the edit as multipart/form-data ({exc})") from None
    response_format = _text(form, "response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise BadRequest(f"response_format must be 'url' or 'b64_json', got {response_format!r}")
    output_format = (_text(form, "output_format") or "png").lower().replace("jpg", "jpeg")
    if output_format not in _OUTPUT_FORMATS:
        raise BadRequest(f"output_format must be png, jpeg or webp, got {output_format!r}")
    n = _int(form, "n", 1)
    if not 1 <= n <= MAX_N:
        raise BadRequest(f"n must be between 1 and {MAX_N}, got {n}")
    seed = _int(form, "seed", seeds.RANDOM)
    if seed < seeds.RANDOM:
        raise BadRequest(f"seed must be -1 (random) or a non-negative integer, got {seed}")
    if seed == seeds.RANDOM:
        seed = seeds.draw(headroom=MAX_N)
    model = _model(_text(form, "model"), svc)
    images = await _images(form, svc.settings.max_image_bytes)

    origin = Origin.of(request, svc, who)
    jobs = [
        await submit(svc, model, _edit_request(form, images, model, seed + i, output_format), origin) for i in range(n)
    ]
    log.info("openai edit submitted", prediction_ids=[j.id for j in jobs], n=n)
    done = await hold(request, svc.store, [j.id for j in jobs], asyncio.gather(*(_finish(job, svc) for job in jobs)))

    data: list[dict[str, Any]] = []
    for job in done:
        for key in job.outputs:
            if response_format == "b64_json":
                raw = await run_in_threadpool(svc.storage.get, key)
                item: dict[str, Any] = {"b64_json": base64.b64encode(raw).decode()}
            else:
                item = {"url": svc.renderer.file_url(origin.base, key)}
            data.append(item | {"seed": job.seed})  # an extension, as on the v3 result
    return {"created": int(time.time()), "data": data, "output_format": output_format}
