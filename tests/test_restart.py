"""Nothing accepted is lost: kill the server hard mid-run, start it again, every job ends."""

from __future__ import annotations

import time

import httpx

from tests.conftest import ServerProc, data_uri, png_bytes


def test_kill_mid_run_and_restart(make_server) -> None:  # type: ignore[no-untyped-def]
    # 10 steps a job, so the first is certainly mid-run when the server dies.
    srv: ServerProc = make_server(QWEN_EDIT_DEFAULT_STEPS="10", QWEN_EDIT_LEASE_S="3")
    ids = [
        srv.submit({"prompt": f"job {i}", "image": data_uri(png_bytes()), "size": "256*256", "seed": i}).json()["data"][
            "id"
        ]
        for i in range(3)
    ]
    deadline = time.monotonic() + 60
    while srv.result(ids[0])["status"] != "processing":
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.1)
    time.sleep(0.5)
    srv.kill()  # SIGKILL to the API and its worker: no chance to clean up

    # Same data folder: a new server process on the same job store.
    again = ServerProc(data_dir=srv.data_dir, env=srv.env, port=srv.port)
    again.start()
    try:
        for pid in ids:
            data = again.wait(pid, timeout=180)
            assert data["status"] == "completed", data
            assert len(data["outputs"]) == 1
            assert httpx.get(data["outputs"][0]).status_code == 200
    finally:
        again.stop()


def test_finished_results_survive_restart(make_server) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = make_server()
    data = srv.submit(
        {"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256", "enable_sync_mode": True}
    ).json()["data"]
    assert data["status"] == "completed"
    srv.stop()
    again = ServerProc(data_dir=srv.data_dir, env=srv.env, port=srv.port).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while True:  # results are served even before the worker is ready
            try:
                if httpx.get(again.url + "/livez", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert again.result(data["id"])["outputs"] == data["outputs"]
    finally:
        again.stop()


def test_sync_mode_timeout_answers_5004_and_job_goes_on(make_server) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = make_server(QWEN_EDIT_SYNC_TIMEOUT_S="0.5", QWEN_EDIT_DEFAULT_STEPS="8")
    r = srv.submit({"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256", "enable_sync_mode": True})
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["status"] == "processing" and data["code"] == 5004
    assert data["error"] == "Sync mode timed out after 0.5 seconds. The prediction is still processing asynchronously."
    assert data["urls"]["get"].endswith(f"/predictions/{data['id']}/result")
    assert srv.wait(data["id"])["status"] == "completed"
