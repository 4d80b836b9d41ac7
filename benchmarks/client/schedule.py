"""Arrival schedules: when each request is sent.

Open loop follows ``vllm bench serve``: inter-arrival gaps are drawn from a gamma distribution with
shape ``burstiness`` and mean ``1 / request_rate`` (burstiness 1 is a Poisson process; below 1 the
arrivals come in bursts, above 1 they are more even). ``inf`` sends everything at once. A schedule
is a list of offsets in seconds from the start, drawn from a seeded generator, so the same
``--seed`` gives the same schedule on every run and for every endpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Load:
    """One load value of a sweep: closed loop (``concurrency`` in flight) or open loop (``rate``)."""

    rate: float | None  # requests per second (open loop); None: closed loop
    concurrency: int | None  # closed loop: requests in flight; open loop: an optional cap
    burstiness: float = 1.0

    @property
    def open(self) -> bool:
        return self.rate is not None

    @property
    def value(self) -> float:
        """The number this load is plotted against: the rate (open loop) or the concurrency."""
        return float(self.rate if self.rate is not None else self.concurrency or 1)

    @property
    def name(self) -> str:
        if self.rate is None:
            return f"C={self.concurrency}"
        cap = f" C<={self.concurrency}" if self.concurrency else ""
        rate = "inf" if math.isinf(self.rate) else f"{self.rate:g}"
        return f"{rate} req/s{cap}"


def arrivals(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of ``count`` requests at ``rate`` requests per second."""
    if count <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * count
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)
    gaps[0] = 0.0  # the first request goes at once, as vLLM's does not wait a gap either
    return [float(t) for t in np.cumsum(gaps)]


def loads(rates: list[float] | None, concurrencies: list[int] | None, burstiness: float) -> list[Load]:
    """The sweep: one load per request rate (each capped by the one ``--max-concurrency``, if any),
    or one per concurrency (closed loop)."""
    if rates:
        if concurrencies and len(concurrencies) > 1:
            raise ValueError("with --request-rate, --max-concurrency takes one value (the cap)")
        cap = concurrencies[0] if concurrencies else None
        return [Load(rate, cap, burstiness) for rate in rates]
    return [Load(None, c, burstiness) for c in (concurrencies or [1])]
