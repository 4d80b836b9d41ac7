"""GET /metrics: job counts and histograms from the store, HTTP latency by route template."""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProc, data_uri, png_bytes


def scrape(srv: ServerProc) -> dict[str, list[tuple[dict[str, str], float]]]:
    r = httpx.get(srv.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    for got, v in samples.get(name, []):
        if all(got.get(k) == want for k, want in labels.items()):
            return v
    raise AssertionError(f"{name}{labels} not in {sorted(samples)}")


def test_metrics_follow_the_jobs(server: ServerProc) -> None:
    before = scrape(server)
    done_before = value(before, "qwen_edit_jobs", status="completed")
    pid = server.submit({"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256"}).json()["data"]["id"]
    assert server.wait(pid)["status"] == "completed"
    server.result(pid)
    after = scrape(server)
    assert value(after, "qwen_edit_jobs", status="completed") == done_before + 1
    assert value(after, "qwen_edit_queue_depth") == 0
    for hist in ("qwen_edit_queue_wait_seconds", "qwen_edit_inference_seconds"):
        count = value(after, hist + "_count")
        assert count >= 1
        assert value(after, hist + "_bucket", le="300.0") <= count
        assert value(after, hist + "_bucket", le="+Inf") == count
        assert value(after, hist + "_sum") > 0 or hist == "qwen_edit_queue_wait_seconds"
    latency = value(
        after,
        "qwen_edit_http_request_duration_seconds_count",
        route="/api/v3/predictions/{prediction_id}/result",
        method="GET",
        status="200",
    )
    assert latency >= 1
    # Raw ids never become label values (route templates only): the label set stays bounded.
    assert not re.search(pid, httpx.get(server.url + "/metrics").text)
    assert value(after, "qwen_edit_workers", state="ready") >= 1
