"""Prometheus metrics of the job store, for ``GET /metrics``.

The API and the workers are separate processes (maybe separate machines), so job metrics are not
counted in memory: a collector asks the job store at scrape time.

* ``qwen_edit_queue_depth``, ``qwen_edit_jobs{status}``: counts of job rows.
* ``qwen_edit_queue_wait_seconds`` and ``qwen_edit_inference_seconds``: histograms derived from the
  job rows (``started_at - created_at`` and ``inference_ms``), aggregated by the database. They cover
  the jobs the store still holds, so retention deleting rows reads as a counter reset, which
  ``rate()`` handles.
* ``qwen_edit_workers{state}``, ``qwen_edit_gpu_memory_bytes{worker,kind}``: what each worker last published.
* ``qwen_edit_http_request_duration_seconds{method,route,status}``: measured in this API process
  (``api/middleware.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.jobs.contract import Status
from server.jobs.store import Histogram as StoreHistogram
from server.jobs.store import JobStore, now_ms

BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0)
_BOUNDS_MS = tuple(int(b * 1000) for b in BUCKETS_S)


def _histogram(name: str, doc: str, h: StoreHistogram) -> HistogramMetricFamily:
    buckets = [(str(b), float(n)) for b, n in zip(BUCKETS_S, h.cumulative, strict=True)]
    buckets.append(("+Inf", float(h.count)))
    metric = HistogramMetricFamily(name, doc)
    metric.add_metric([], buckets, h.sum_ms / 1000.0)
    return metric


class JobStoreCollector(Collector):
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.count_by_status()
        depth = GaugeMetricFamily("qwen_edit_queue_depth", "Jobs waiting for a worker.")
        depth.add_metric([], counts.get(Status.CREATED.value, 0))
        yield depth
        by_status = GaugeMetricFamily("qwen_edit_jobs", "Jobs in the store by status.", labels=["status"])
        for status, n in sorted(counts.items()):
            by_status.add_metric([status], n)
        yield by_status
        yield _histogram(
            "qwen_edit_queue_wait_seconds",
            "Time from submission to a worker starting the job.",
            self.store.queue_wait_histogram(_BOUNDS_MS),
        )
        yield _histogram(
            "qwen_edit_inference_seconds",
            "Pipeline time of completed jobs.",
            self.store.inference_histogram(_BOUNDS_MS),
        )
        workers = GaugeMetricFamily("qwen_edit_workers", "Workers by state (as last reported).", labels=["state"])
        states: dict[str, int] = {}
        for w in self.store.workers.list():
            states[w.state.value] = states.get(w.state.value, 0) + 1
        for state, n in sorted(states.items()):
            workers.add_metric([state], n)
        yield workers
        gpu = GaugeMetricFamily(
            "qwen_edit_gpu_memory_bytes", "CUDA memory of each worker's GPU.", labels=["worker", "kind"]
        )
        for worker_id, stats in sorted(self.store.workers.gpu_memory(now_ms()).items()):
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
