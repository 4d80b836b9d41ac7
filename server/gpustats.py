"""Worker-side GPU facts: CUDA out-of-memory detection and recovery, and memory use published
through the job store's ``meta`` table so the API process (a different process, maybe a different
machine) can export it on /metrics. torch is imported lazily: the API process never loads it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from sqlalchemy import delete, insert, select, update

from server.jobs.models import meta
from server.jobs.store import JobStore, now_ms

_PREFIX = "gpu_memory/"


def _torch() -> Any:
    return sys.modules.get("torch")  # only when the pipeline already loaded it


def is_cuda_oom(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError`` (a RuntimeError subclass), whatever raised it."""
    torch = _torch()
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


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


def cuda_memory() -> dict[str, int] | None:
    """Bytes allocated / reserved / total on this worker's GPU; None without CUDA."""
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "reserved": int(torch.cuda.memory_reserved(device)),
        "total": int(torch.cuda.get_device_properties(device).total_memory),
        "at": now_ms(),
    }


def publish_gpu_memory(store: JobStore, worker_id: str, stats: dict[str, int]) -> None:
    key, value = (_PREFIX + worker_id)[:64], json.dumps(stats)
    with store.engine.begin() as conn:
        if not conn.execute(update(meta).where(meta.c.key == key).values(value=value)).rowcount:
            conn.execute(insert(meta).values(key=key, value=value))


def read_gpu_memory(store: JobStore, max_age_ms: int = 60_000) -> dict[str, dict[str, int]]:
    """Worker id -> its latest stats (stale entries, from workers gone for a minute, are dropped)."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(meta.c.key, meta.c.value).where(meta.c.key.startswith(_PREFIX))).all()
    out: dict[str, dict[str, int]] = {}
    for key, value in rows:
        try:
            stats = json.loads(value)
        except ValueError:
            continue
        if now_ms() - int(stats.get("at", 0)) <= max_age_ms:
            out[key[len(_PREFIX) :]] = stats
    return out


def forget_gpu_memory(store: JobStore, worker_id: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(delete(meta).where(meta.c.key == (_PREFIX + worker_id)[:64]))
