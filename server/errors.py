"""One error hierarchy. HTTP-level errors become the v3 error envelope in one place (api/errors.py);
job-level errors carry the v3 task error code onto a ``failed`` prediction.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error answered at the HTTP level: ``{"code": status, "message", "data": {"error"}, "error"}``."""

    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    status_code = 401

    def __init__(self, message: str = "Missing or invalid API key.") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status_code = 403


class NotFound(ApiError):
    status_code = 404


class PayloadTooLarge(ApiError):
    status_code = 413


class TooManyRequests(ApiError):
    status_code = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class ServiceUnavailable(ApiError):
    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


# --- job-level failures (a ``failed`` prediction with ``data.code``) ----------------------------

MISSING_PARAMETER = 1400
INVALID_PARAMETER = 1401
MEDIA_ACCESS_FAILED = 1402
TASK_FAILED = 1403
INTERNAL_ERROR = 5000
SERVICE_UNAVAILABLE = 5003
TIMEOUT = 5004


class JobError(Exception):
    """Ends a job as ``failed`` with a v3 task error code and a message meant for the client."""

    code = TASK_FAILED

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class MediaError(JobError):
    code = MEDIA_ACCESS_FAILED


class InvalidInput(JobError):
    code = INVALID_PARAMETER


class Cancelled(JobError):
    code = TASK_FAILED

    def __init__(self, message: str = "Cancelled by the client.") -> None:
        super().__init__(message)
