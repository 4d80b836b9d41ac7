"""One error hierarchy, shared by every process.

ApiError                 answered at the HTTP level, as the v3 envelope (api/handlers.py)
    BadRequest 400, Unauthorized 401, PaymentRequired 402, Forbidden 403, NotFound 404, PayloadTooLarge 413,
    TooManyRequests 429, ServiceUnavailable 503
JobError                 ends a job as ``failed`` with a v3 task code (worker/failures.py)
    InvalidInput 1401, MediaError 1402, Cancelled 1403
StoreUnavailable         the job store cannot be reached or written (503 at the API; the
                         worker waits and retries)
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


class PaymentRequired(ApiError):
    status_code = 402


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

INVALID_PARAMETER = 1401
MEDIA_ACCESS_FAILED = 1402
TASK_FAILED = 1403
INTERNAL_ERROR = 5000
TIMEOUT = 5004  # sync mode: the hold ended, the job goes on


def blames_client(code: int) -> bool:
    """The request was at fault (a 4xx where a door answers synchronously): its parameters or its
    media. 1403 is the task itself failing (a model bug, a cancel): not the client's doing."""
    return code in (INVALID_PARAMETER, MEDIA_ACCESS_FAILED)


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


class StoreUnavailable(Exception):
    """The job store's database cannot be reached or written right now (a restart, a full disk)."""


def first_line(exc: BaseException) -> str:
    """An exception's message, its first line only (driver errors carry whole SQL statements)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
