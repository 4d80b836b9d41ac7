"""Cancellation through the API in process: a queued job fails at once, a running one at its next
step (the fake runner holds it mid-run until then), a finished one is left as it is."""

from __future__ import annotations

from typing import Any

from tests.support import KEY1, MODEL_URL, data_uri, png_bytes, wait_for

BODY = {"prompt": "hang", "image": data_uri(png_bytes()), "size": "256*256", "num_inference_steps": 30}


def cancel(client: Any, pid: str) -> dict[str, Any]:
    r = client.post(f"/api/v3/predictions/{pid}/cancel", headers=KEY1)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def result(client: Any, pid: str) -> dict[str, Any]:
    data: dict[str, Any] = client.get(f"/api/v3/predictions/{pid}/result", headers=KEY1).json()["data"]
    return data


def test_cancel_queued_running_and_finished_jobs(stack: Any, fake_runner: Any) -> None:
    running = stack.post(MODEL_URL, json=BODY, headers=KEY1).json()["data"]["id"]
    wait_for(lambda: result(stack, running).get("progress", {}).get("total") == 30, what="running")
    queued = stack.post(MODEL_URL, json=BODY, headers=KEY1).json()["data"]["id"]
    assert result(stack, queued)["status"] == "created"  # the one worker is busy

    # Queued: failed at once, in the cancel response itself.
    cancelled = cancel(stack, queued)
    assert cancelled["status"] == "failed" and cancelled["code"] == 1403
    assert cancelled["error"] == "Cancelled by the client before it started."

    # Running: still processing in the answer, failed at its next step.
    assert cancel(stack, running)["status"] == "processing"
    final = wait_for(lambda: (d := result(stack, running))["status"] == "failed" and d, what="the run stopped")
    assert final["error"] == "Cancelled by the client while running." and final["progress"]["step"] < 30

    # The worker goes on serving; cancelling a finished job changes nothing.
    ok = stack.post(MODEL_URL, json={**BODY, "prompt": "x", "enable_sync_mode": True}, headers=KEY1).json()["data"]
    assert ok["status"] == "completed"
    assert cancel(stack, ok["id"])["status"] == "completed"
    assert stack.post("/api/v3/predictions/nope/cancel", headers=KEY1).status_code == 404
