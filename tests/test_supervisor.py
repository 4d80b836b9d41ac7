"""server/worker/supervisor.py's per-slot worker environment, Settings.for_slot for stand-alone workers,
and `qwen-edit worker --workers N`: one GPU per worker (CUDA_VISIBLE_DEVICES), one variant and one
stable id per slot, whichever way a worker starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.jobs.contract import WorkerInfo
from server.jobs.store import JobStore
from server.settings import Settings
from server.worker.supervisor import worker_env
from tests.support import ROOT, server_env


def test_one_gpu_per_worker_slot() -> None:
    settings = Settings(embedded_workers=4)
    assert [worker_env(settings, slot, {})["CUDA_VISIBLE_DEVICES"] for slot in range(4)] == ["0", "1", "2", "3"]
    # A listed set of GPUs is shared out in order, wrapping when there are more workers than GPUs.
    listed = {"CUDA_VISIBLE_DEVICES": "2, 5,7"}
    assert [worker_env(settings, slot, listed)["CUDA_VISIBLE_DEVICES"] for slot in range(4)] == ["2", "5", "7", "2"]
    # One worker keeps whatever the machine gives it.
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(Settings(embedded_workers=1), 0, {})
    assert worker_env(Settings(embedded_workers=1), 0, {"CUDA_VISIBLE_DEVICES": "3"})["CUDA_VISIBLE_DEVICES"] == "3"


def test_each_slot_gets_its_variant_and_model() -> None:
    settings = Settings(
        embedded_workers=3,
        variants=["edit-2511", "edit-plus"],
        weights_by_variant={"edit-2511": "/models/2511", "edit-plus": "/models/plus"},
        weights="/models/edit",
    )
    envs = [worker_env(settings, slot, {"QWEN_EDIT_MODEL": "/models/edit"}) for slot in range(3)]
    assert [(e["QWEN_EDIT_VARIANT"], e["QWEN_EDIT_MODEL"]) for e in envs] == [
        ("edit-2511", "/models/2511"),
        ("edit-plus", "/models/plus"),
        ("edit-2511", "/models/2511"),
    ]
    # A variant with no model configured falls back to the default source (no inherited model).
    bare = Settings(embedded_workers=2, variants=["edit", "edit-plus"], weights="/models/edit")
    assert "QWEN_EDIT_MODEL" not in worker_env(bare, 1, {"QWEN_EDIT_MODEL": "/models/edit"})
    assert worker_env(bare, 0, {})["QWEN_EDIT_MODEL"] == "/models/edit"


def test_stand_alone_worker_takes_its_variant_by_slot() -> None:
    settings = Settings(
        variants=["edit", "edit-plus"], weights_by_variant={"edit-plus": "/models/plus"}, weights="/models/edit"
    )
    assert (settings.for_slot(0).variant, settings.for_slot(0).weights) == ("edit", "/models/edit")
    assert (settings.for_slot(1).variant, settings.for_slot(1).weights) == ("edit-plus", "/models/plus")
    assert settings.for_slot(3).variant == "edit-plus"
    plain = Settings(variant="edit-2511")
    assert plain.for_slot(5) is plain  # no variants list: the worker serves `variant`


def test_configured_worker_id_is_made_per_slot() -> None:
    several = Settings(embedded_workers=2, worker_id="gpu-host")
    assert [worker_env(several, slot, {})["QWEN_EDIT_WORKER_ID"] for slot in range(2)] == ["gpu-host/0", "gpu-host/1"]
    assert "QWEN_EDIT_WORKER_ID" not in worker_env(Settings(embedded_workers=1, worker_id="gpu-host"), 0, {})


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.e2e
def test_worker_command_supervises_one_worker_per_gpu(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """`qwen-edit worker --workers 2`: two slot workers, one GPU and one stable id each, both ready
    in the job store; a worker that dies is restarted; SIGTERM drains them and exits 0."""
    env = {
        **server_env(tmp_path, tiny_models["edit"]),
        "QWEN_EDIT_WORKER_ID": "host-a",
        "QWEN_EDIT_WARMUP": "false",
        "QWEN_EDIT_LOG_JSON": "true",
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "worker", "--workers", "2"],
        cwd=ROOT,
        env={k: v for k, v in {**os.environ, **env}.items() if k != "CUDA_VISIBLE_DEVICES"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    store = JobStore.open(Settings(data_dir=tmp_path))
    store.migrate()  # alongside the workers' own migrations, as a replica starting with them would
    try:

        def ready() -> dict[str, WorkerInfo]:
            return {w.id: w for w in store.workers.list() if w.state == "ready"}

        deadline = time.monotonic() + 180
        while set(ready()) != {"host-a/0", "host-a/1"}:
            assert proc.poll() is None and time.monotonic() < deadline, store.workers.list()
            time.sleep(0.3)
        children = _children(proc.pid)
        assert len(children) == 2
        assert sorted(_environ(pid)["CUDA_VISIBLE_DEVICES"] for pid in children) == ["0", "1"]
        # A worker that dies is started again, under the same slot and id.
        first = ready()["host-a/0"].pid
        os.kill(first, signal.SIGKILL)
        while ready().get("host-a/0") is None or ready()["host-a/0"].pid == first:
            assert proc.poll() is None and time.monotonic() < deadline + 120
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        assert {w.id: w.state for w in store.workers.list()} == {"host-a/0": "stopped", "host-a/1": "stopped"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        store.close()
