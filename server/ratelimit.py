"""Per-API-key limits on submissions, like the hosted tiers: requests per minute and jobs in flight.

* Rate: a token bucket per key (capacity = the per-minute limit, refilled continuously), kept in
  this API process. With several API replicas behind a balancer each enforces it on its own share.
* Concurrency: jobs of the key that are queued or running, counted in the job store, so it holds
  across replicas and restarts.

Both answer 429 with a Retry-After that says when trying again can succeed.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select

from server.errors import TooManyRequests
from server.jobs.models import Status, jobs
from server.jobs.store import JobStore

ANONYMOUS = "-"  # the bucket of callers without a key (auth disabled)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, key: str | None) -> None:
        """Spend one token of ``key``'s bucket or raise TooManyRequests (a no-op when unlimited)."""
        if self.per_minute <= 0:
            return
        rate = self.per_minute / 60.0  # tokens per second
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key or ANONYMOUS)
            if bucket is None:
                bucket = self._buckets[key or ANONYMOUS] = _Bucket(float(self.per_minute), now)
            bucket.tokens = min(float(self.per_minute), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait_s = math.ceil((1.0 - bucket.tokens) / rate)
            if len(self._buckets) > 10_000:  # forget idle keys: full buckets carry no state
                self._buckets = {k: b for k, b in self._buckets.items() if b.tokens < self.per_minute}
        raise TooManyRequests(
            f"Rate limit exceeded: at most {self.per_minute} requests per minute for this API key.", wait_s
        )


def jobs_in_flight(store: JobStore, key: str | None) -> int:
    """Jobs of this key that are queued or running."""
    who = jobs.c.api_key_id.is_(None) if key is None else jobs.c.api_key_id == key
    stmt = (
        select(func.count())
        .select_from(jobs)
        .where(who, jobs.c.status.in_([Status.CREATED.value, Status.PROCESSING.value]))
    )
    with store.engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def check_concurrency(store: JobStore, key: str | None, limit: int) -> None:
    if limit <= 0:
        return
    if jobs_in_flight(store, key) >= limit:
        raise TooManyRequests(
            f"Too many predictions in flight: at most {limit} queued or running per API key; wait for some to finish.",
            5,
        )
