"""A worker group through the real server: two gloo ranks on the CPU (QWEN_EDIT_PARALLEL=ulysses=2,
the tiny model built with two attention heads). One job: a rank is killed mid-run, the group restarts
whole, the job goes back to the queue and completes, and its pixels are a single process's for the
same seed (within 1/255). The pieces run in process in tests/test_parallel.py; CFG-parallel's numerics
with the same pipeline there too."""

from __future__ import annotations

import io
import os
import re
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import ServerProc, data_uri, png_bytes, server_env, wait_for

pytestmark = pytest.mark.e2e

STEPS = 6
SIDE = 256


def _single_process(model: Path, image: bytes) -> Image.Image:
    from pipelines.loader import load_pipeline
    from pipelines.registry import get_variant
    from pipelines.runner import EditInputs, EditRunner

    variant = get_variant("edit")
    pipe = load_pipeline(str(model), variant, device="cpu", dtype=__import__("torch").float32)
    inputs = EditInputs(
        images=[Image.open(io.BytesIO(image)).convert("RGB")],
        prompt="make it blue",
        seed=7,
        num_inference_steps=STEPS,
        width=SIDE,
        height=SIDE,
    )
    return EditRunner(pipe, variant, "cpu")(inputs).images[0]


def _follower_pid(srv: ServerProc) -> int | None:
    found = re.findall(
        r"group rank started\s.*?pid=(\d+)", srv.log_path.read_text(errors="replace") if srv.log_path else ""
    )
    return int(found[-1]) if found else None


def test_a_group_survives_a_dead_rank_and_gives_a_single_process_s_pixels(tmp_path: Path) -> None:
    from weights.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny-2-heads", "edit", heads=2)
    image = png_bytes((64, 48))
    srv = ServerProc(
        data_dir=tmp_path / "data",
        env=server_env(tmp_path / "data", model, QWEN_EDIT_PARALLEL="ulysses=2", QWEN_EDIT_LOG_JSON="false"),
    )
    srv.start(timeout=300)
    try:
        body = {
            "prompt": "make it blue",
            "image": data_uri(image),
            "seed": 7,
            "size": f"{SIDE}*{SIDE}",
            "num_inference_steps": STEPS,
            "output_format": "png",
        }
        r = srv.submit(body)
        assert r.status_code == 200, r.text
        pid = r.json()["data"]["id"]
        first = _follower_pid(srv)
        assert first is not None, srv.log()
        # Mid-run: kill rank 1. Rank 0 must not fail the job: the group restarts and reruns it.
        wait_for(lambda: srv.result(pid).get("progress", {}).get("step", 0) >= 1, timeout=120, what="a step done")
        os.kill(first, signal.SIGKILL)
        data = srv.wait(pid, timeout=300)
        assert data["status"] == "completed", (data, srv.log())
        assert _follower_pid(srv) != first  # a new rank 1: the group was restarted whole
        log = srv.log_path.read_text(errors="replace") if srv.log_path else ""
        assert "rank of the group died mid-run" in log or "of the worker group exited" in log
        got = Image.open(io.BytesIO(httpx.get(data["outputs"][0], headers=srv.headers, timeout=30).content))
        want = _single_process(model, image)
        assert got.size == want.size == (SIDE, SIDE)
        diff = np.abs(np.asarray(got.convert("RGB"), dtype=np.int16) - np.asarray(want, dtype=np.int16))
        assert diff.max() <= 1, f"max pixel difference {diff.max()} from a single process"
    finally:
        srv.stop()
