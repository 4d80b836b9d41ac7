"""Stopping ``qwen-edit serve`` while a job runs says, at once, what it waits for and for how long,
and that a second signal hands the job back; the second signal does, and nothing is lost."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from server.jobs.contract import Status
from server.jobs.store import JobStore
from server.settings import Settings
from tests.support import data_uri, png_bytes, wait_for

pytestmark = pytest.mark.e2e


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def _event(log: Path, name: str) -> dict[str, Any] | None:
    return next((e for e in _events(log) if e.get("event") == name), None)


def test_a_stop_that_waits_says_why_and_a_second_signal_hands_the_job_back(make_server: Any) -> None:
    srv = make_server(QWEN_EDIT_LOG_JSON="true", QWEN_EDIT_WORKER_DRAIN_S="300")
    body = {"prompt": "long", "image": data_uri(png_bytes()), "size": "512*512", "num_inference_steps": 100}
    answer = srv.submit(body).json()
    pid = answer["data"].get("id") or pytest.fail(str(answer))
    wait_for(lambda: srv.result(pid)["status"] == "processing", 120, "the job to run")

    srv.proc.send_signal(signal.SIGTERM)  # the API process only, as systemd's KillMode=mixed does
    stopping = wait_for(lambda: _event(srv.log_path, "stopping"), 30, "the stop to be announced")
    assert stopping["drain_s"] == 300 and "hand the jobs back" in stopping["hint"], stopping
    worker = wait_for(lambda: _event(srv.log_path, "worker stopping"), 120, "the worker to say what it finishes")
    assert any(pid in item for item in worker["finishing"]), worker
    assert worker["drain_s"] == 300 and "second SIGTERM" in worker["hint"], worker

    srv.proc.send_signal(signal.SIGTERM)  # the second request: hand the job back now
    assert srv.proc.wait(120) == 0
    store = JobStore.open(Settings(data_dir=srv.data_dir))
    try:
        job = store.get(pid)
        assert job is not None and job.status == Status.CREATED and job.attempts <= 1, job
    finally:
        store.close()
