"""The worker registry: each worker's last word about itself, server-wide values every replica must
agree on (the webhook secret, the upload signing key, a generated API key), and the GPU memory
figures CUDA workers publish for the API's /metrics (another process, maybe another machine).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select, update

from server.jobs.contract import WorkerInfo
from server.jobs.db import Database
from server.jobs.models import meta, workers

_GPU_PREFIX = "gpu_memory/"


class WorkerRegistry:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- workers -------------------------------------------------------------------------

    def record(self, info: WorkerInfo) -> None:
        values = info.to_row()
        with self.db.write() as conn:
            if not conn.execute(update(workers).where(workers.c.id == info.id).values(**values)).rowcount:
                conn.execute(insert(workers).values(**values))

    def list(self) -> list[WorkerInfo]:
        with self.db.read() as conn:
            rows = conn.execute(select(workers).order_by(workers.c.id)).all()
        return [WorkerInfo.from_row(r) for r in rows]

    # --- server-wide values --------------------------------------------------------------

    def meta_value(self, key: str, factory: Callable[[], str]) -> str:
        """The stored value of ``key``, created once with ``factory()`` (the first writer wins)."""
        with self.db.read() as conn:
            row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
        if row:
            return str(row[0])
        try:
            with self.db.write() as conn:
                conn.execute(insert(meta).values(key=key, value=factory()))
        except sa_exc.IntegrityError:  # another process won the race: read theirs
            pass
        with self.db.read() as conn:
            return str(conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar_one())

    # --- GPU memory ----------------------------------------------------------------------

    def publish_gpu_memory(self, worker_id: str, stats: dict[str, int]) -> None:
        key, value = (_GPU_PREFIX + worker_id)[:64], json.dumps(stats)
        with self.db.write() as conn:
            if not conn.execute(update(meta).where(meta.c.key == key).values(value=value)).rowcount:
                conn.execute(insert(meta).values(key=key, value=value))

    def gpu_memory(self, now_ms: int, max_age_ms: int = 60_000) -> dict[str, dict[str, int]]:
        """Worker id -> its latest stats (stale entries, from workers gone for a minute, are dropped)."""
        with self.db.read() as conn:
            rows = conn.execute(select(meta.c.key, meta.c.value).where(meta.c.key.startswith(_GPU_PREFIX))).all()
        out: dict[str, dict[str, int]] = {}
        for key, value in rows:
            try:
                stats = json.loads(value)
            except ValueError:
                continue
            if now_ms - int(stats.get("at", 0)) <= max_age_ms:
                out[key[len(_GPU_PREFIX) :]] = stats
        return out
