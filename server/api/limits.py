"""Per-API-key limits on submissions, like the hosted tiers.

* Rate: a token bucket per key (capacity = the per-minute limit, refilled continuously), kept in
  this API process. With several API replicas behind a balancer each enforces it on its own share.
* Jobs in flight per key and the queue cap: counted by the job store atomically with the insert
  (``Admission``), so they hold across replicas and restarts; see ``api/submit.py``.

Each answers 429 with a Retry-After that says when trying again can succeed.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from server.errors import TooManyRequests

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


def queue_full() -> TooManyRequests:
    return TooManyRequests("The queue is full; retry later.", retry_after_s=5)


def too_many_in_flight(limit: int) -> TooManyRequests:
    return TooManyRequests(
        f"Too many predictions in flight: at most {limit} queued or running per API key; wait for some to finish.", 5
    )
