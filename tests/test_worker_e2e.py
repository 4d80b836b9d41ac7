"""Worker faults through the real server (processes, the real tiny pipeline): a killed worker, a
full disk, a graceful shutdown, logs bound to the prediction id. Nothing accepted is lost; the
server keeps serving. (A raising pipeline, CUDA out of memory and the other failure classes run
in process with a fake runner: tests/test_worker.py.) Logs are JSON here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ServerProc, data_uri, png_bytes, server_env, wait_for

pytestmark = pytest.mark.e2e


def _mount_tmpfs(path: Path, size: str = "32m") -> str | None:
    """Mount a small tmpfs (a disk that fills up); None when mounting is not permitted.

    Roomy enough for the outputs of every test in this module before the full-disk test fills it.
    """
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount unavailable: {exc}"
    return None if proc.returncode == 0 else f"mount -t tmpfs not permitted: {proc.stderr.strip()}"


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Any]) -> Iterator[ServerProc]:
    data = tmp_path_factory.mktemp("faulty")
    small = data / "small-disk"
    why_not = _mount_tmpfs(small)
    env = server_env(
        data,
        tiny_models["edit"],
        QWEN_EDIT_LOG_JSON="true",
        QWEN_EDIT_STORAGE_DIR=str(small),
    )
    srv = ServerProc(data_dir=data, env=env).start()
    srv.env["_TMPFS_SKIP"] = why_not or ""
    yield srv
    srv.stop()
    if why_not is None:
        subprocess.run(["umount", "-l", str(small)], check=False)


def submit(srv: ServerProc, prompt: str, image: str | None = None, **extra: Any) -> str:
    r = srv.submit({"prompt": prompt, "image": image or data_uri(png_bytes()), "size": "256*256", **extra})
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["id"])


def assert_still_serving(srv: ServerProc) -> None:
    assert httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
    done = srv.wait(submit(srv, "a normal edit"))
    assert done["status"] == "completed", done


def test_json_logs_carry_the_prediction_id(faulty: ServerProc) -> None:
    pid = submit(faulty, "logged")
    assert faulty.wait(pid)["status"] == "completed"
    assert faulty.log_path is not None
    events = []
    for line in faulty.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("prediction_id") == pid:
                events.append(record["event"])
    # The API process logs the submission, the worker process the run: both carry the id.
    assert {"prediction created", "job started", "job completed"} <= set(events), events


def _worker_pid(srv: ServerProc, job_id: str) -> int:
    with sqlite3.connect(srv.data_dir / "jobs.db") as db:
        row = db.execute(
            "SELECT w.pid FROM jobs j JOIN workers w ON w.id = j.lease_owner "
            "WHERE j.id = ? AND j.status = 'processing'",
            (job_id,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_killed_worker_is_restarted_and_its_job_reclaimed(faulty: ServerProc) -> None:
    pid = submit(faulty, "a long one", num_inference_steps=30)  # certainly mid-run when killed
    deadline = time.monotonic() + 60
    worker = 0
    while not worker and time.monotonic() < deadline:
        worker = _worker_pid(faulty, pid)
        time.sleep(0.05)
    assert worker, faulty.log()
    os.kill(worker, signal.SIGKILL)
    done = faulty.wait(pid, timeout=180)
    assert done["status"] == "completed", done
    with sqlite3.connect(faulty.data_dir / "jobs.db") as db:
        assert db.execute("SELECT attempts FROM jobs WHERE id = ?", (pid,)).fetchone()[0] == 2
    assert "worker exited; restarting" in faulty.log()
    assert_still_serving(faulty)


def _fill(path: Path) -> Path:
    filler = path / "filler.bin"
    # Opening may itself fail with ENOSPC where the disk is already full: that is full enough.
    with contextlib.suppress(OSError), open(filler, "wb") as fh:
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    return filler


def test_full_disk_fails_clearly_and_recovers(faulty: ServerProc, image_host: tuple[str, dict[str, Any]]) -> None:
    if faulty.env["_TMPFS_SKIP"]:
        pytest.skip(faulty.env["_TMPFS_SKIP"])
    base, routes = image_host
    routes["/disk.png"] = (200, png_bytes(), {"Content-Type": "image/png"})
    storage = Path(faulty.env["QWEN_EDIT_STORAGE_DIR"])
    filler = _fill(storage)
    try:
        # An inline image cannot be stored: refused at once, nothing half-accepted.
        r = faulty.submit({"prompt": "x", "image": data_uri(png_bytes())})
        assert r.status_code == 503 and "storage" in r.json()["message"].lower(), r.text
        assert int(r.headers["Retry-After"]) > 0
        # A URL image is accepted; its output cannot be written: a clear failure, not a lost job.
        done = faulty.wait(submit(faulty, "x", base + "/disk.png"))
        assert done["status"] == "failed" and "Could not store the output" in done["error"], done
        assert "No space left" in done["error"]
        assert httpx.get(faulty.url + "/readyz").status_code == 200
    finally:
        filler.unlink(missing_ok=True)
    done = faulty.wait(submit(faulty, "x", base + "/disk.png"))
    assert done["status"] == "completed", done


def test_graceful_shutdown_drains_and_loses_nothing(faulty: ServerProc) -> None:
    ids = [submit(faulty, f"drain {i}") for i in range(3)]
    faulty.stop()  # SIGTERM: workers finish the job in hand, queued jobs stay queued
    with sqlite3.connect(faulty.data_dir / "jobs.db") as db:
        states = dict(db.execute(f"SELECT id, status FROM jobs WHERE id IN ({','.join('?' * 3)})", ids).fetchall())
    assert "processing" not in states.values(), states
    faulty.start()
    for pid in ids:
        assert faulty.wait(pid)["status"] == "completed"


def test_a_full_disk_under_the_job_store_never_kills_the_worker(tmp_path: Path, tiny_models: dict[str, Any]) -> None:
    """SQLite's disk fills while a job runs: the worker keeps its finished output and retries the
    write, readiness says 503 meanwhile, and once there is room again the job completes, served by
    the same worker process, the server never stopped."""
    data = tmp_path / "small-disk"
    why_not = _mount_tmpfs(data, "24m")
    if why_not:
        pytest.skip(why_not)
    env = server_env(
        data,
        tiny_models["edit"],
        QWEN_EDIT_LOG_JSON="true",
        QWEN_EDIT_STORAGE_DIR=str(tmp_path / "files"),  # outputs elsewhere: only the store's disk fills
        QWEN_EDIT_LEASE_S="120",
    )
    srv = ServerProc(data_dir=data, env=env, log_dir=tmp_path)  # the log must not fill up with the disk
    try:
        srv.start()
        pid = submit(srv, "a long one", num_inference_steps=30)
        wait_for(lambda: srv.result(pid).get("progress", {}).get("step", 0) >= 1, 60, "the job mid-run")
        worker = _worker_pid(srv, pid)
        filler = _fill(data)
        try:
            wait_for(lambda: "will retry the write" in srv.log(), 180, "the worker retrying its write")
            wait_for(lambda: httpx.get(srv.url + "/readyz", timeout=10).status_code == 503, 30, "readiness 503")
            assert srv.proc is not None and srv.proc.poll() is None
        finally:
            filler.unlink(missing_ok=True)
        done = srv.wait(pid, timeout=120)
        assert done["status"] == "completed" and len(done["outputs"]) == 1, done
        assert httpx.get(done["outputs"][0], timeout=10).status_code == 200
        wait_for(lambda: httpx.get(srv.url + "/readyz", timeout=10).status_code == 200, 60, "ready again")
        with sqlite3.connect(data / "jobs.db") as db:
            (attempts,) = db.execute("SELECT attempts FROM jobs WHERE id = ?", (pid,)).fetchone()
            pids = [row[0] for row in db.execute("SELECT pid FROM workers")]
        assert attempts == 1 and pids == [worker]  # the same run's output, the same worker process
        assert "keeps dying" not in srv.log() and "worker exited" not in srv.log()
    finally:
        srv.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)


@pytest.mark.parametrize(
    "sig,direct",
    [
        (signal.SIGINT, False),  # Ctrl-C in a terminal: the whole foreground process group
        (signal.SIGTERM, True),  # systemd's default KillMode: every process of the unit, workers too
    ],
)
def test_a_signal_to_the_whole_group_drains_like_one_to_serve(make_server: Any, sig: int, direct: bool) -> None:
    srv: ServerProc = make_server(QWEN_EDIT_LOG_JSON="true", QWEN_EDIT_WORKER_DRAIN_S="300")
    pid = submit(srv, "a long one", num_inference_steps=20)
    wait_for(lambda: srv.result(pid).get("progress", {}).get("step", 0) >= 1, 60, "the job mid-run")
    worker = _worker_pid(srv, pid)
    assert srv.proc is not None
    os.killpg(srv.proc.pid, sig)
    if direct:
        os.kill(worker, sig)
    assert srv.proc.wait(180) == 0, srv.log()
    with sqlite3.connect(srv.data_dir / "jobs.db") as db:
        status, attempts = db.execute("SELECT status, attempts FROM jobs WHERE id = ?", (pid,)).fetchone()
    assert (status, attempts) == ("completed", 1), srv.log()  # drained: finished, not handed back
    assert "handed back" not in srv.log()
