"""``qwen-edit serve --api-workers N``: N API processes on one port, sharing only the store and
storage; the embedded worker still starts once; /metrics sums every process's samples."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.support import KEY1, MODEL_URL, data_uri, png_bytes, wait_for

pytestmark = pytest.mark.e2e


def latency_count(url: str, route: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    pattern = rf'qwen_edit_http_request_duration_seconds_count\{{[^}}]*route="{re.escape(route)}"[^}}]*\}} (\S+)'
    return sum(float(v) for v in re.findall(pattern, text))


def test_two_api_processes_one_worker_and_metrics_summed(make_server: Any) -> None:
    # A low offload threshold: the submit below goes through a body helper of an API process too.
    srv = make_server(QWEN_EDIT_API_WORKERS="2", QWEN_EDIT_BODY_OFFLOAD_BYTES="1000")
    pids: set[int] = set()
    calls = [0]

    def livez_pid() -> bool:
        calls[0] += 1
        pids.add(httpx.get(srv.url + "/livez", timeout=10).json()["pid"])  # a new connection each time
        return len(pids) >= 2

    wait_for(livez_pid, what="two API processes to answer /livez")
    assert srv.proc is not None and srv.proc.pid not in pids  # the parent only supervises
    ready = httpx.get(srv.url + "/readyz", timeout=10).json()
    assert len(ready["workers"]) == 1  # one embedded worker, not one per API process
    # Every process's /livez requests are in the histogram, whichever process answers the scrape.
    wait_for(lambda: latency_count(srv.url, "/livez") == calls[0], what="the livez count to sum both processes")
    assert latency_count(srv.url, "/livez") == calls[0]
    # A job submitted to one process is served by the one worker and read back from either.
    image = data_uri(png_bytes((64, 48), noise=True))  # over the threshold
    r = httpx.post(srv.url + MODEL_URL, json={"prompt": "x", "image": image, "size": "256*256"}, headers=KEY1)
    assert r.status_code == 200, r.text
    result = srv.url + f"/api/v3/predictions/{r.json()['data']['id']}/result"
    done = wait_for(
        lambda: (d := httpx.get(result, headers=KEY1, timeout=10).json()["data"])["status"] == "completed" and d,
        timeout=120,
        what="the job to complete",
    )
    assert done["outputs"]
