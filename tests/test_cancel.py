"""Progress and cancellation through the real server: queued jobs fail at once, running ones at the next step."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import data_uri, png_bytes


def _cancel(srv: Any, pid: str) -> dict[str, Any]:
    r = httpx.post(f"{srv.url}/api/v3/predictions/{pid}/cancel", headers=srv.headers, timeout=10)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def test_cancel_queued_and_running_jobs_with_progress(server: Any) -> None:
    srv = server  # the session's server: its one worker is idle between tests, which wait for their jobs
    body = {"prompt": "slow", "image": data_uri(png_bytes()), "size": "256*256", "num_inference_steps": 30}
    running = srv.submit(body).json()["data"]["id"]
    queued = srv.submit(body).json()["data"]["id"]

    # Progress rises while the first job runs (the one worker is busy, so the second stays queued).
    seen: list[int] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        data = srv.result(running)
        if "progress" in data:
            assert data["progress"]["total"] == 30
            seen.append(data["progress"]["step"])
        if len(set(seen)) >= 3 and seen[-1] >= 2:
            break
        time.sleep(0.2)
    assert seen == sorted(seen) and len(set(seen)) >= 3, seen
    assert srv.result(queued)["status"] == "created"

    # Queued: failed at once, in the cancel response itself.
    cancelled = _cancel(srv, queued)
    assert cancelled["status"] == "failed" and "before it started" in cancelled["error"]

    # Running: fails at its next step with a clear error, well before its 30 steps.
    _cancel(srv, running)
    final = srv.wait(running, timeout=120)
    assert final["status"] == "failed"
    assert final["error"] == "Cancelled by the client while running."
    assert final["progress"]["step"] < 30

    # The worker goes on serving.
    ok = srv.submit({**body, "num_inference_steps": 2, "enable_sync_mode": True}).json()["data"]
    assert ok["status"] == "completed"
    assert _cancel(srv, ok["id"])["status"] == "completed"  # cancelling a finished job changes nothing
    r = httpx.post(f"{srv.url}/api/v3/predictions/nope/cancel", headers=srv.headers, timeout=10)
    assert r.status_code == 404
