"""Uploads (both flows) and serving stored files back by URL."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from server.api.auth import Caller
from server.api.deps import Services, base_url, caller, services
from server.api.schemas import UploadEnvelope, UploadRequest, envelope, error_responses
from server.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge
from server.jobs.store import now_ms
from server.media.images import ImageLimits
from server.storage.base import content_type_of, new_upload_key, valid_key

router = APIRouter(tags=["media"])


async def _check_image(data: bytes, request: Request, svc: Services) -> str:
    try:
        # Off the event loop: in a helper process for a big file (server/api/bigbody.py).
        limits = ImageLimits(svc.settings.max_image_bytes, svc.settings.max_image_pixels)
        return (await request.app.state.body_helpers.probe(data, limits)).format
    except ValueError as exc:
        raise BadRequest(f"Only images can be uploaded here: {exc}") from exc


def _upload_data(svc: Services, request: Request, key: str, size: int) -> dict[str, Any]:
    return {
        "type": "image",
        "download_url": f"{base_url(request, svc.settings)}/files/{quote(key)}",
        "filename": key.rsplit("/", 1)[-1],
        "size": size,
    }


UPLOAD_ERRORS = error_responses(
    {
        400: ("Not an image (or not a readable one)", "Only images can be uploaded here: image is empty"),
        401: ("Missing or invalid API key", "Missing API key: send 'Authorization: Bearer <key>'."),
        413: ("Larger than the image limit", "The file is larger than 26214400 bytes."),
        503: ("Storage or job store unavailable", "File storage is unavailable; try again shortly."),
    }
)
PUT_ERRORS = error_responses(
    {
        400: ("Not the announced bytes, or not an image", "Received 10 bytes; this upload announced 12."),
        403: ("Bad, expired or already used signature", "This upload URL was already used."),
        404: ("No such upload key", "Not found."),
        413: ("More bytes than announced", "More bytes than the 12 announced for this upload."),
        503: ("Storage or job store unavailable", "File storage is unavailable; try again shortly."),
    }
)
FILE_ERRORS = error_responses({404: ("No such file", "File not found.")})


async def _store_upload(svc: Services, key: str, data: bytes, key_id: str | None) -> None:
    """Keep an accepted upload: its row (the one-time claim) first, then its bytes."""
    if not await run_in_threadpool(svc.store.uploads.claim, key, len(data), key_id, now_ms()):
        raise Forbidden("This upload URL was already used.")
    try:
        await run_in_threadpool(svc.storage.put, key, data, content_type_of(key))
    except BaseException:
        await run_in_threadpool(svc.store.uploads.release, key)  # nothing stored: the URL may be retried
        raise


@router.post(
    "/api/v3/media/upload/binary",
    response_model=UploadEnvelope,
    summary="Upload an image (multipart)",
    responses=UPLOAD_ERRORS,
)
@router.post(
    "/api/v2/media/upload/binary",
    response_model=UploadEnvelope,
    summary="Upload an image (v2 path)",
    responses=UPLOAD_ERRORS,
)
async def upload_binary(
    request: Request,
    file: UploadFile = File(..., description="The image file."),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> dict[str, Any]:
    data = await file.read(svc.settings.max_image_bytes + 1)
    if len(data) > svc.settings.max_image_bytes:
        raise PayloadTooLarge(f"The file is larger than {svc.settings.max_image_bytes} bytes.")
    await _check_image(data, request, svc)
    key = new_upload_key(file.filename or "upload")
    await _store_upload(svc, key, data, who.key_id)
    return envelope(_upload_data(svc, request, key, len(data)))


@router.post(
    "/api/v3/media/uploads",
    response_model=UploadEnvelope,
    summary="Ask for a signed PUT upload URL",
    responses=UPLOAD_ERRORS,
)
async def create_upload(
    body: UploadRequest, request: Request, svc: Services = Depends(services), _: Caller = Depends(caller)
) -> dict[str, Any]:
    if body.size > svc.settings.max_image_bytes:
        raise PayloadTooLarge(f"The file is larger than {svc.settings.max_image_bytes} bytes.")
    key = new_upload_key(body.filename)
    expires, signature = svc.upload_signer.sign(key, body.size)
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


@router.put(
    "/api/v3/media/uploads/{key:path}",
    response_model=UploadEnvelope,
    summary="Receive the bytes of a signed upload (no API key; each URL is good for one upload)",
    responses=PUT_ERRORS,
)
async def put_upload(
    key: str,
    request: Request,
    size: int = Query(..., ge=1),
    expires: int = Query(...),
    signature: str = Query(..., min_length=64, max_length=64),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    svc.upload_signer.verify(key, size, expires, signature)
    if not key.startswith("uploads/") or not valid_key(key):
        raise NotFound("Not found.")
    if await run_in_threadpool(svc.store.uploads.taken, key):  # before reading any byte (the claim decides races)
        raise Forbidden("This upload URL was already used.")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > size:
            raise PayloadTooLarge(f"More bytes than the {size} announced for this upload.")
        chunks.append(chunk)
    if received != size:
        raise BadRequest(f"Received {received} bytes; this upload announced {size}.")
    data = b"".join(chunks)
    await _check_image(data, request, svc)
    await _store_upload(svc, key, data, None)
    return envelope(_upload_data(svc, request, key, len(data)))


class OpenedFileResponse(FileResponse):
    """A ``FileResponse`` of a file the route has opened already. One removed meanwhile (by
    retention's sweep) is still sent whole from its open descriptor: opened by path once the
    headers were out, it failed mid-response. Ranges, ETag and Last-Modified are FileResponse's."""

    def __init__(self, opened: BinaryIO, path: Path, **kwargs: Any) -> None:
        super().__init__(path, stat_result=os.fstat(opened.fileno()), **kwargs)
        self._opened = opened

    @contextlib.asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        yield anyio.AsyncFile(self._opened)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Never the server's own send of the path (ASGI pathsend): the path may be gone.
        extensions = {k: v for k, v in scope.get("extensions", {}).items() if k != "http.response.pathsend"}
        try:
            await super().__call__({**scope, "extensions": extensions}, receive, send)
        finally:
            self._opened.close()


FILE_ROUTE: dict[str, Any] = {
    "summary": "A stored input, upload or output (unguessable URL, no API key)",
    "response_class": Response,
    "responses": {200: {"content": {"image/*": {}}, "description": "The file"}, **FILE_ERRORS},
}


@router.get("/files/{key:path}", **FILE_ROUTE)
@router.head("/files/{key:path}", **FILE_ROUTE)
async def get_file(key: str, svc: Services = Depends(services)) -> Response:
    if not key.startswith(("outputs/", "uploads/", "inputs/")) or not valid_key(key):
        raise NotFound("File not found.")
    path = svc.storage.local_path(key)
    if path is not None:
        try:
            opened = await run_in_threadpool(open, path, "rb")
        except FileNotFoundError:  # removed since (retention)
            raise NotFound("File not found.") from None
        headers = {"Cache-Control": "private, max-age=86400"}
        return OpenedFileResponse(opened, path, media_type=content_type_of(key), headers=headers)
    try:
        data = await run_in_threadpool(svc.storage.get, key)
    except (FileNotFoundError, KeyError):
        raise NotFound("File not found.") from None
    return Response(data, media_type=content_type_of(key))
