"""Nothing accepted is lost: kill the server hard mid-run, start it again, every job ends.

One server pair runs the whole story (each start costs a worker's imports): a sync request that
times out and goes on, a finished result, a crash mid-run, a restart that serves the finished
result at once and runs the interrupted and queued jobs."""

from __future__ import annotations

import httpx
import pytest

from tests.support import ServerProc, data_uri, png_bytes, wait_for

pytestmark = pytest.mark.e2e


def test_sync_timeout_then_kill_mid_run_and_restart(make_server) -> None:  # type: ignore[no-untyped-def]
    # 10 steps a job, so the first async job is certainly mid-run when the server dies.
    srv: ServerProc = make_server(QWEN_EDIT_DEFAULT_STEPS="10", QWEN_EDIT_LEASE_S="3", QWEN_EDIT_SYNC_TIMEOUT_S="0.5")

    # Sync mode past its timeout: the 5004 answer, and the job goes on to completion.
    r = srv.submit({"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256", "enable_sync_mode": True})
    assert r.status_code == 200
    timed_out = r.json()["data"]
    assert timed_out["status"] == "processing" and timed_out["code"] == 5004
    assert timed_out["error"] == (
        "Sync mode timed out after 0.5 seconds. The prediction is still processing asynchronously."
    )
    assert timed_out["urls"]["get"].endswith(f"/predictions/{timed_out['id']}/result")
    finished = srv.wait(timed_out["id"])
    assert finished["status"] == "completed"

    ids = [
        srv.submit({"prompt": f"job {i}", "image": data_uri(png_bytes()), "size": "256*256", "seed": i}).json()["data"][
            "id"
        ]
        for i in range(3)
    ]
    # Mid-run: a step of it is done (the heartbeat published it), and more are to come.
    wait_for(lambda: srv.result(ids[0]).get("progress", {}).get("step", 0) >= 1, 60, "the first job mid-run")
    srv.kill()  # SIGKILL to the API and its worker: no chance to clean up

    # Same data folder: a new server process on the same job store.
    again = ServerProc(data_dir=srv.data_dir, env=srv.env, port=srv.port).start(wait_ready=False)
    try:
        again.wait_live()  # finished results are served as soon as the API is up, before the worker is ready
        assert again.result(finished["id"])["outputs"] == finished["outputs"]
        assert httpx.get(finished["outputs"][0]).status_code == 200
        again.wait_ready()
        for pid in ids:
            data = again.wait(pid, timeout=180)
            assert data["status"] == "completed", data
            assert len(data["outputs"]) == 1
            assert httpx.get(data["outputs"][0]).status_code == 200
    finally:
        again.stop()
