"""Every HTTP-level error leaves as the v3 error envelope (OpenAI's shape under ``/v1/``), from the
handlers installed here and nowhere else."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.submit import unknown_path_message
from server.errors import ApiError, StoreUnavailable, first_line
from server.storage.base import StorageError

log = structlog.get_logger(__name__)


OPENAI_PREFIX = "/v1/"  # the OpenAI-compatible routes answer errors in OpenAI's shape
_OPENAI_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    504: ("server_error", "timeout"),
}


def openai_error_body(status: int, message: str) -> dict[str, Any]:
    """``{"error": {"message", "type", "code", "param"}}`` as the OpenAI API answers errors."""
    kind, code = _OPENAI_ERRORS.get(status, ("server_error", "server_error"))
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, request: Request | None = None
) -> JSONResponse:
    if request is not None and request.url.path.startswith(OPENAI_PREFIX):
        return JSONResponse(openai_error_body(status, message), status_code=status, headers=headers)
    body = {"code": status, "message": message, "data": {"error": message}, "error": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "is required"
        elif err.get("type") == "json_invalid":
            where, msg = "body", "is not valid JSON"
        parts.append(f"{where}: {msg}" if not msg.startswith(where) else msg)
    return "Invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.headers, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _describe(list(exc.errors())), request=request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # No route matched (404), or the path exists with other methods (405, with Allow).
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404 and message == "Not Found":
            try:
                message = unknown_path_message(request)
            except ApiError as refusal:  # no key: the 401 comes first
                return error_response(refusal.status_code, refusal.message, refusal.headers, request)
        return error_response(exc.status_code, message, dict(exc.headers or {}), request)

    @app.exception_handler(StoreUnavailable)
    async def _store(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.error("job store unavailable", error=str(exc))
        return error_response(503, "The job store is unavailable; try again shortly.", {"Retry-After": "2"}, request)

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage unavailable", error=first_line(exc))
        return error_response(503, "File storage is unavailable; try again shortly.", {"Retry-After": "2"}, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "Internal server error.", request=request)
