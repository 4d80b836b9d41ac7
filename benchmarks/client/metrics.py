"""Per-request measurements and their summary per endpoint and load, under vLLM's field names.

A request's times, all in ms, all as the client sees them:

- ``e2el``: submit until the output is downloaded (``--no-download``: until the client saw
  ``completed``). Only completed requests enter a latency figure; failures are counted by code.
- ``upload``: the submit request (its body goes up, the server answers ``created``); async only.
- ``queue``: the time at the server not spent in inference (waiting in the queue, reading the
  input, storing the output): e2el minus upload, inference and download.
- ``inference``: the server's own ``timings.inference``.
- ``download``: fetching the first output.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.client.schedule import Load

METRICS = ("e2el", "upload", "queue", "inference", "download")


@dataclass
class Record:
    endpoint: str
    load: str
    index: int
    input: str
    sent_at_s: float = 0.0  # from the start of this load's run
    id: str = ""
    ok: bool = False
    code: str = ""  # why it failed: "http 401", "1403", "timeout", "ConnectError", "interrupted"
    error: str = ""
    e2el_ms: float | None = None
    upload_ms: float | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None
    download_ms: float | None = None
    polls: int = 0
    resolution_ms: float | None = None  # the gap before the poll that saw the end (0: answered when done)
    output_bytes: int = 0


@dataclass(frozen=True)
class Goodput:
    """``--goodput e2el:MS queue:MS``: limits, in ms, that a request must all meet to count."""

    limits: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, items: list[str] | None) -> Goodput:
        limits = {}
        for item in items or []:
            m = re.fullmatch(r"(\w+):(\d+(?:\.\d+)?)", item)
            if not m or m.group(1) not in METRICS:
                raise ValueError(f"--goodput {item!r}: give METRIC:MS with METRIC one of {', '.join(METRICS)}")
            limits[m.group(1)] = float(m.group(2))
        return cls(limits)

    def met(self, r: Record) -> bool:
        if not r.ok:
            return False
        return all((getattr(r, f"{k}_ms") or 0.0) <= limit for k, limit in self.limits.items())

    def describe(self) -> str:
        return ", ".join(f"{k} <= {v / 1000:g} s" for k, v in self.limits.items())


def summarize(
    records: list[Record], duration_s: float, load: Load, percentiles: list[float], goodput: Goodput
) -> dict[str, Any]:
    """One result: vLLM's fields where the meaning is the same, then this client's image fields."""
    ok = [r for r in records if r.ok]
    out: dict[str, Any] = {
        "request_rate": load.rate if load.rate is not None else float("inf"),
        "burstiness": load.burstiness,
        "max_concurrency": load.concurrency,
        "load": load.name,
        "load_value": load.value,
        "num_prompts": len(records),
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(Counter(r.code for r in records if not r.ok)),
        "error_examples": {r.code: r.error for r in reversed(records) if not r.ok},  # one message per code
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "request_goodput": None,
        "goodput_share": None,
        "polls_per_request": float(np.mean([r.polls for r in ok])) if ok else None,
    }
    if goodput.limits:
        good = sum(goodput.met(r) for r in records)
        out["request_goodput"] = good / duration_s if duration_s > 0 else 0.0
        out["goodput_share"] = good / len(records) if records else 0.0
    for metric in METRICS:
        values = [v for r in ok if (v := getattr(r, f"{metric}_ms")) is not None]
        out.update(stats(metric, values, percentiles))
    return out


def stats(metric: str, values: list[float], percentiles: list[float]) -> dict[str, float | None]:
    if not values:
        keys = ["mean", "median", "std", *(f"p{_pct(p)}" for p in percentiles)]
        return {f"{k}_{metric}_ms": None for k in keys}
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {
        f"mean_{metric}_ms": float(arr.mean()),
        f"median_{metric}_ms": float(np.median(arr)),
        f"std_{metric}_ms": float(arr.std()),
    }
    for p in percentiles:
        out[f"p{_pct(p)}_{metric}_ms"] = float(np.percentile(arr, p))
    return out


def _pct(p: float) -> str:
    return f"{p:g}".replace(".", "_") if p != int(p) else str(int(p))


def capacity(results: list[dict[str, Any]], goodput: Goodput, target: float = 0.99) -> dict[str, Any] | None:
    """The highest measured load of one endpoint at which at least ``target`` of the requests met
    every goodput limit (and none failed); None when no load did."""
    if not goodput.limits:
        return None
    good = [r for r in results if r["failed"] == 0 and (r["goodput_share"] or 0.0) >= target]
    if not good:
        return None
    best = max(good, key=lambda r: r["load_value"])
    return {"load": best["load"], "request_throughput": best["request_throughput"], "goodput": goodput.describe()}
