"""Uploads (both flows) and serving stored files back by URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from server.api.deps import Services, base_url, caller, services
from server.api.schemas import UploadEnvelope, UploadRequest, envelope
from server.errors import BadRequest, NotFound, PayloadTooLarge
from server.media.images import ImageLimits, probe_image
from server.storage.base import content_type_of, new_upload_key

router = APIRouter(tags=["media"])


def _check_image(data: bytes, svc: Services) -> str:
    try:
        return probe_image(data, ImageLimits(svc.settings.max_image_bytes, svc.settings.max_image_pixels)).format
    except ValueError as exc:
        raise BadRequest(f"Only images can be uploaded here: {exc}") from exc


def _upload_data(svc: Services, request: Request, key: str, size: int) -> dict[str, Any]:
    return {
        "type": "image",
        "download_url": f"{base_url(request, svc.settings)}/files/{quote(key)}",
        "filename": key.rsplit("/", 1)[-1],
        "size": size,
    }


@router.post("/api/v3/media/upload/binary", response_model=UploadEnvelope, summary="Upload an image (multipart)")
@router.post("/api/v2/media/upload/binary", response_model=UploadEnvelope, summary="Upload an image (v2 path)")
async def upload_binary(
    request: Request,
    file: UploadFile = File(..., description="The image file."),
    svc: Services = Depends(services),
    _: str | None = Depends(caller),
) -> dict[str, Any]:
    data = await file.read(svc.settings.max_image_bytes + 1)
    if len(data) > svc.settings.max_image_bytes:
        raise PayloadTooLarge(f"The file is larger than {svc.settings.max_image_bytes} bytes.")
    _check_image(data, svc)
    key = new_upload_key(file.filename or "upload")
    await run_in_threadpool(svc.storage.put, key, data, content_type_of(key))
    return envelope(_upload_data(svc, request, key, len(data)))


@router.post("/api/v3/media/uploads", response_model=UploadEnvelope, summary="Ask for a signed PUT upload URL")
async def create_upload(
    body: UploadRequest, request: Request, svc: Services = Depends(services), _: str | None = Depends(caller)
) -> dict[str, Any]:
    if body.size > svc.settings.max_image_bytes:
        raise PayloadTooLarge(f"The file is larger than {svc.settings.max_image_bytes} bytes.")
    key = new_upload_key(body.filename)
    expires, signature = svc.uploads.sign(key, body.size)
    data = _upload_data(svc, request, key, body.size)
    put_url = (
        f"{base_url(request, svc.settings)}/api/v3/media/uploads/{quote(key)}"
        f"?size={body.size}&expires={expires}&signature={signature}"
    )
    data["upload"] = {
        "method": "PUT",
        "url": put_url,
        "headers": {"Content-Type": body.content_type or content_type_of(key)},
    }
    return envelope(data)


@router.put("/api/v3/media/uploads/{key:path}", summary="Receive the bytes of a signed upload (no API key)")
async def put_upload(
    key: str,
    request: Request,
    size: int = Query(..., ge=1),
    expires: int = Query(...),
    signature: str = Query(..., min_length=64, max_length=64),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    svc.uploads.verify(key, size, expires, signature)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > size:
            raise PayloadTooLarge(f"More bytes than the {size} announced for this upload.")
        chunks.append(chunk)
    data = b"".join(chunks)
    _check_image(data, svc)
    await run_in_threadpool(svc.storage.put, key, data, content_type_of(key))
    return envelope(_upload_data(svc, request, key, len(data)))


@router.get("/files/{key:path}", summary="A stored input, upload or output (unguessable URL, no API key)")
async def get_file(key: str, svc: Services = Depends(services)) -> Response:
    if not key.startswith(("outputs/", "uploads/", "inputs/")):
        raise NotFound("File not found.")
    path = svc.storage.local_path(key)
    if path is not None:
        return FileResponse(path, media_type=content_type_of(key), headers={"Cache-Control": "private, max-age=86400"})
    try:
        data = await run_in_threadpool(svc.storage.get, key)
    except (FileNotFoundError, KeyError):
        raise NotFound("File not found.") from None
    return Response(data, media_type=content_type_of(key))
