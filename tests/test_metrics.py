"""GET /metrics in process: job counts and histograms from the store, HTTP latency by route template."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import KEY1, MODEL_URL, data_uri, png_bytes


def scrape(client: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    r = client.get("/metrics")
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


def test_metrics_follow_the_jobs(stack: Any) -> None:
    before = scrape(stack)
    done_before = value(before, "qwen_edit_jobs", status="completed")
    body = {"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256", "enable_sync_mode": True}
    pid = stack.post(MODEL_URL, json=body, headers=KEY1).json()["data"]["id"]
    assert stack.get(f"/api/v3/predictions/{pid}/result", headers=KEY1).json()["data"]["status"] == "completed"
    after = scrape(stack)
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
    assert not re.search(pid, stack.get("/metrics").text)
    assert value(after, "qwen_edit_workers", state="ready") >= 1
