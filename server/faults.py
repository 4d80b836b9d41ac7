"""TEST-ONLY fault injection for the worker. OFF unless ``QWEN_EDIT_FAULT_INJECTION=true``.

With it on, a prompt that contains one of these markers makes the worker misbehave on purpose, so
tests can prove the server survives faults that are hard to cause on a CPU machine:

``[[fault:raise]]``   the pipeline raises a RuntimeError (a bug in the model code)
``[[fault:oom]]``     the pipeline raises ``torch.cuda.OutOfMemoryError`` (CUDA out of memory)
``[[fault:hang]]``    on the job's first attempt, the worker stalls until it is killed (worker death)

Never enable it in production: anyone who can submit a prompt could then fail jobs at will.
"""

from __future__ import annotations

import threading

MARKER_RAISE = "[[fault:raise]]"
MARKER_OOM = "[[fault:oom]]"
MARKER_HANG = "[[fault:hang]]"


class InjectedFault(RuntimeError):
    """The error ``[[fault:raise]]`` raises."""


def inject(prompt: str, attempt: int, stop: threading.Event) -> None:
    """Called by the worker before running the pipeline, only when fault injection is enabled."""
    if MARKER_RAISE in prompt:
        raise InjectedFault("injected fault: the pipeline raised")
    if MARKER_OOM in prompt:
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected fault)")
    if MARKER_HANG in prompt and attempt <= 1:
        stop.wait(300)  # until the test kills this process (or the worker is told to stop)
