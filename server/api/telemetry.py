"""Prometheus metrics of the job store, for ``GET /metrics``.

The API and the workers are separate processes (maybe separate machines), so job metrics are not
counted in memory: a collector reads the job store's counters at scrape time (``server/jobs/stats.py``:
kept in the transactions that move jobs, so a scrape reads a few dozen rows however many jobs are
stored, and every API replica reports the same numbers, before and after a restart).

* ``qwen_edit_queue_depth``, ``qwen_edit_jobs{status}``: jobs per status.
* ``qwen_edit_queue_wait_seconds`` and ``qwen_edit_inference_seconds``: histograms of each start
  (``started_at - created_at``) and of each completed job's ``inference_ms``. They only grow
  (retention deleting jobs does not lower them).
* ``qwen_edit_workers{state}``, ``qwen_edit_gpu_memory_bytes{worker,kind}``: what each worker last published.
* ``qwen_edit_http_request_duration_seconds{method,route,status}``: measured in this API process
  (``api/middleware.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.jobs import stats
from server.jobs.contract import Status
from server.jobs.store import JobStore, now_ms

BUCKETS_S = tuple(ms / 1000 for ms in stats.BOUNDS_MS)


def _histogram(name: str, doc: str, h: stats.Histogram) -> HistogramMetricFamily:
    buckets = [(str(b), float(n)) for b, n in zip(BUCKETS_S, h.cumulative, strict=True)]
    buckets.append(("+Inf", float(h.count)))
    metric = HistogramMetricFamily(name, doc)
    metric.add_metric([], buckets, h.sum_ms / 1000.0)
    return metric


class JobStoreCollector(Collector):
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        # What the registry checks names against at registration, without asking the store: so
        # that registering (app start-up) runs no query at all.
        yield GaugeMetricFamily("qwen_edit_queue_depth", "")
        yield GaugeMetricFamily("qwen_edit_jobs", "", labels=["status"])
        yield HistogramMetricFamily("qwen_edit_queue_wait_seconds", "")
        yield HistogramMetricFamily("qwen_edit_inference_seconds", "")
        yield GaugeMetricFamily("qwen_edit_workers", "", labels=["state"])
        yield GaugeMetricFamily("qwen_edit_gpu_memory_bytes", "", labels=["worker", "kind"])

    def collect(self) -> Iterator[Metric]:
        counters = self.store.counters()
        counts = {s.value: counters.get(f"jobs.{s.value}", 0) for s in Status}
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
            stats.histogram(counters, stats.QUEUE_WAIT),
        )
        yield _histogram(
            "qwen_edit_inference_seconds",
            "Pipeline time of completed jobs.",
            stats.histogram(counters, stats.INFERENCE),
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
        for worker_id, memory in sorted(self.store.workers.gpu_memory(now_ms()).items()):
            for kind in ("allocated", "reserved", "total"):
                if kind in memory:
                    gpu.add_metric([worker_id, kind], float(memory[kind]))
        yield gpu


def build_registry() -> tuple[CollectorRegistry, Histogram]:
    """A registry of its own per app (no process globals) and the HTTP latency histogram in it.
    The JobStoreCollector joins it once the store is open (app lifespan).

    Under ``serve --api-workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set by the CLI before the API
    processes start) each process writes its latency samples to files in that folder and a scrape,
    whichever process answers it, sums every process's: the numbers do not depend on which one a
    scrape lands on. The job store's metrics are read from the store, the same from any process."""
    registry = CollectorRegistry(auto_describe=True)
    shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    if shared:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    latency = Histogram(
        "qwen_edit_http_request_duration_seconds",
        "HTTP request latency by route template.",
        ["method", "route", "status"],
        buckets=BUCKETS_S,
        registry=None if shared else registry,  # shared: read back from the files, not twice
    )
    return registry, latency
