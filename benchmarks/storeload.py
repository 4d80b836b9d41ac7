"""Load helpers of benchmarks/overhead.py: concurrent HTTP clients, and a store filled with
finished jobs straight through the store (no HTTP, no worker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx


async def hammer(
    url: str,
    requests: Sequence[tuple[str, str, dict[str, Any] | None]],
    clients: int,
    ids: list[str] | None = None,
    check: bool = True,
) -> tuple[list[float], float]:
    """Send (method, path, json) requests from ``clients`` concurrent connections: latencies (ms), wall s."""
    latencies: list[float] = []
    queue = list(requests)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)) as http:

        async def loop() -> None:
            while queue:
                method, path, body = queue.pop()
                started = time.perf_counter()
                r = await http.request(method, path, json=body)
                latencies.append((time.perf_counter() - started) * 1000)
                if check:
                    r.raise_for_status()
                if ids is not None:
                    ids.append(r.json()["data"]["id"])

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
    return latencies, time.perf_counter() - started


def fill_store(data: Path, count: int) -> list[str]:
    """Insert ``count`` finished jobs straight into the server's database."""
    from benchmarks.jobs import store_job
    from server.jobs.contract import Status
    from server.jobs.store import JobStore, new_id, now_ms
    from server.settings import Settings

    store = JobStore.open(Settings(data_dir=data))
    ids = []
    now = now_ms()
    for _ in range(count):
        job_id = new_id()
        store.create(
            store_job(
                id=job_id,
                status=Status.COMPLETED,
                seed=0,
                output_format="jpeg",
                finished_at=now,
                outputs=[f"{job_id}/0.jpeg"],
                inference_ms=100,
                progress_total=0,
            )
        )
        ids.append(job_id)
    store.close()
    return ids
