"""/livez, /readyz and /metrics in process. Readiness trusts only worker rows refreshed lately: a
worker that died a moment ago, its row still saying "ready", does not make the server ready."""

from __future__ import annotations

import os
from typing import Any

from server.jobs.contract import PRESENCE_FRESH_S, WorkerInfo, WorkerState
from server.jobs.store import JobStore, now_ms


def _row(store: JobStore, state: WorkerState, age_s: float, worker_id: str = "host/0") -> None:
    at = now_ms() - int(age_s * 1000)
    store.workers.record(
        WorkerInfo(
            id=worker_id, host="host", pid=1, variant="edit", state=state, detail="", started_at=at, heartbeat_at=at
        )
    )


def test_readiness_counts_only_fresh_workers(api: Any, app_settings: Any) -> None:
    assert api.get("/livez").json() == {"status": "ok", "pid": os.getpid()}  # TestClient: this process
    r = api.get("/readyz")
    assert r.status_code == 503 and "none running" in r.json()["message"] and r.headers["Retry-After"]
    store = JobStore.open(app_settings)
    try:
        _row(store, WorkerState.READY, PRESENCE_FRESH_S + 1)  # the row of a worker killed 11 s ago
        assert api.get("/readyz").status_code == 503
        _row(store, WorkerState.LOADING, 0.5)  # its replacement, loading
        r = api.get("/readyz")
        assert r.status_code == 503 and "host/0: loading" in r.json()["message"]
        _row(store, WorkerState.READY, 0.5)
        body = api.get("/readyz").json()
        assert body["status"] == "ready" and [w["state"] for w in body["workers"]] == ["ready"]
        # What the deployment runs, from its settings, for `qwen-edit bench` to record.
        config = body["config"]
        assert config["variants"] == ["edit"] and config["default_steps"] == app_settings.default_steps
        assert config["memory_mode"] == app_settings.memory_mode and config["batch_max_size"] == 1
        assert {"device", "preset", "weights", "version"} <= set(config)
    finally:
        store.close()
