"""What a job's failure tells its client: one table from exception types to v3 task codes.

The most specific entry wins (the exception's own class first, then its bases in MRO order), as
httpx maps httpcore's errors, so a subclass can always be given its own code and message.

    JobError            (its own code: media 1402, our input checks 1401, cancelled 1403 ...)
    PipelineInputError  the pipeline's own input checks (too long a prompt, a bad LoRA) -> 1401
    StorageError        the output could not be stored                                   -> 5000
    CUDA out of memory  torch.cuda.OutOfMemoryError                                       -> 5000
    anything else       a task failure, with its traceback in the log                    -> 1403

An unexpected ``ValueError`` raised deep inside a library is not the client's fault: it is a 1403.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import structlog

from pipelines.errors import PipelineInputError
from server.errors import INTERNAL_ERROR, INVALID_PARAMETER, TASK_FAILED, JobError, first_line
from server.storage.base import StorageError

log = structlog.get_logger(__name__)

Describe = Callable[[BaseException], JobError]


def _as_is(exc: BaseException) -> JobError:
    assert isinstance(exc, JobError)
    return exc


def _invalid_input(exc: BaseException) -> JobError:
    return JobError(f"Invalid input: {exc}", INVALID_PARAMETER)


def _storage(exc: BaseException) -> JobError:
    return JobError(f"Could not store the output: {exc}", INTERNAL_ERROR)


def _out_of_memory(exc: BaseException) -> JobError:
    log.error("CUDA out of memory", error=first_line(exc))
    return JobError(
        "The GPU ran out of memory running this prediction; try a smaller size or fewer images. "
        f"({first_line(exc) or 'CUDA out of memory'})",
        INTERNAL_ERROR,
    )


def _task_failed(exc: BaseException) -> JobError:
    log.error("job raised", exc_info=exc)
    return JobError(f"Task execution failed: {type(exc).__name__}: {exc}", TASK_FAILED)


def _table() -> dict[type[BaseException], Describe]:
    table: dict[type[BaseException], Describe] = {
        JobError: _as_is,
        PipelineInputError: _invalid_input,
        StorageError: _storage,
    }
    torch = sys.modules.get("torch")  # only where the pipeline already loaded it
    if torch is not None:
        table[torch.cuda.OutOfMemoryError] = _out_of_memory
    return table


def failure_for(exc: BaseException) -> JobError:
    """The JobError that ends a job which raised ``exc``."""
    table = _table()
    for cls in type(exc).__mro__:
        describe = table.get(cls)
        if describe is not None:
            return describe(exc)
    return _task_failed(exc)


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)
