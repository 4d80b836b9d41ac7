"""The worker's GPU: memory figures to publish, and a clean slate after a failed run. torch is only
looked up where the pipeline already imported it, so nothing here loads it."""

from __future__ import annotations

import sys
from typing import Any


def _torch() -> Any:
    return sys.modules.get("torch")


def free_cuda_memory() -> None:
    """Return cached blocks to the driver after a failed run, so the next job starts clean."""
    torch = _torch()
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # a broken context: nothing more to do here
        pass


def cuda_memory(now_ms: int) -> dict[str, int] | None:
    """Bytes allocated / reserved / total on this worker's GPU; None without CUDA."""
    torch = _torch()
    try:
        if torch is None or not torch.cuda.is_available():
            return None
        device = torch.cuda.current_device()
        return {
            "allocated": int(torch.cuda.memory_allocated(device)),
            "reserved": int(torch.cuda.memory_reserved(device)),
            "total": int(torch.cuda.get_device_properties(device).total_memory),
            "at": now_ms,
        }
    except (AttributeError, RuntimeError):  # torch still importing (another thread), or a broken context
        return None
