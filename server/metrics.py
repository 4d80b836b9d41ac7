"""Prometheus metrics on ``GET /metrics``.

The API and the workers are separate processes (maybe separate machines), so job metrics are not
counted in memory: a custom collector reads them from the job store at scrape time.

* ``qwen_edit_queue_depth``, ``qwen_edit_jobs{status}``: counts of job rows.
* ``qwen_edit_queue_wait_seconds`` and ``qwen_edit_inference_seconds``: histograms derived from the
  job rows (``started_at - created_at`` and ``inference_ms``), aggregated by the database in one
  query. They cover the jobs the store still holds, so retention deleting rows reads as a counter
  reset, which ``rate()`` handles.
* ``qwen_edit_gpu_memory_bytes{worker,kind}``: what each CUDA worker last published (server/gpustats.py).
* ``qwen_edit_http_request_duration_seconds{method,route,status}``: measured in this API process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Select, case, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.gpustats import read_gpu_memory
from server.jobs.models import Status, jobs
from server.jobs.store import JobStore

BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0)


def _histogram_query(expr: Any, where: Any) -> Select[Any]:
    # One row: count, sum (ms), then one cumulative count per bucket.
    cols: list[Any] = [func.count(), func.coalesce(func.sum(expr), 0)]
    cols += [func.coalesce(func.sum(case((expr <= int(b * 1000), 1), else_=0)), 0) for b in BUCKETS_S]
    return select(*cols).select_from(jobs).where(where)


class JobStoreCollector(Collector):
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def _histogram(self, name: str, doc: str, expr: Any, where: Any) -> HistogramMetricFamily:
        with self.store.engine.connect() as conn:
            row = conn.execute(_histogram_query(expr, where)).one()
        count, total_ms, *cumulative = (int(v or 0) for v in row)
        buckets = [(str(b), float(n)) for b, n in zip(BUCKETS_S, cumulative, strict=True)]
        buckets.append(("+Inf", float(count)))
        metric = HistogramMetricFamily(name, doc)
        metric.add_metric([], buckets, total_ms / 1000.0)
        return metric

    def collect(self) -> Iterator[Metric]:
        counts = self.store.count_by_status()
        depth = GaugeMetricFamily("qwen_edit_queue_depth", "Jobs waiting for a worker.")
        depth.add_metric([], counts.get(Status.CREATED.value, 0))
        yield depth
        by_status = GaugeMetricFamily("qwen_edit_jobs", "Jobs in the store by status.", labels=["status"])
        for status, n in sorted(counts.items()):
            by_status.add_metric([status], n)
        yield by_status
        yield self._histogram(
            "qwen_edit_queue_wait_seconds",
            "Time from submission to a worker starting the job.",
            jobs.c.started_at - jobs.c.created_at,
            jobs.c.started_at.is_not(None),
        )
        yield self._histogram(
            "qwen_edit_inference_seconds",
            "Pipeline time of completed jobs.",
            jobs.c.inference_ms,
            jobs.c.status == Status.COMPLETED.value,
        )
        workers = GaugeMetricFamily("qwen_edit_workers", "Workers by state (as last reported).", labels=["state"])
        states: dict[str, int] = {}
        for w in self.store.list_workers():
            states[w.state] = states.get(w.state, 0) + 1
        for state, n in sorted(states.items()):
            workers.add_metric([state], n)
        yield workers
        gpu = GaugeMetricFamily(
            "qwen_edit_gpu_memory_bytes", "CUDA memory of each worker's GPU.", labels=["worker", "kind"]
        )
        for worker_id, stats in sorted(read_gpu_memory(self.store).items()):
            for kind in ("allocated", "reserved", "total"):
                if kind in stats:
                    gpu.add_metric([worker_id, kind], float(stats[kind]))
        yield gpu


def build_registry() -> tuple[CollectorRegistry, Histogram]:
    """A registry of its own per app (no process globals) and the HTTP latency histogram in it.
    The JobStoreCollector joins it once the store is open (app lifespan)."""
    registry = CollectorRegistry(auto_describe=True)
    latency = Histogram(
        "qwen_edit_http_request_duration_seconds",
        "HTTP request latency by route template.",
        ["method", "route", "status"],
        buckets=BUCKETS_S,
        registry=registry,
    )
    return registry, latency


class RequestTimer:
    """ASGI middleware: observe each request's latency under its route template (not its raw path)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(scope["method"], template, str(status)).observe(time.perf_counter() - started)
