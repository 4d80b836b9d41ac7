"""Dynamic batching: compatible queued jobs share one pipeline call (``JobParams.batch_key``,
``EditRunner.run_batch``), and each job's output is what it would have been alone."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.loader import load_pipeline
from pipelines.registry import get_variant
from pipelines.runner import EditInputs, EditRunner, condition_size
from server.jobs.contract import ImageRef, JobParams, LoraRef
from tests.support import ServerProc, data_uri, png_bytes, server_env


@pytest.fixture(scope="module")
def runner(tiny_models: dict[str, Path]) -> EditRunner:
    import torch

    variant = get_variant("edit")
    return EditRunner(
        load_pipeline(str(tiny_models["edit"]), variant, device="cpu", dtype=torch.float32), variant, "cpu"
    )


def _inputs(prompt: str, seed: int, color: tuple[int, int, int], size: tuple[int, int] = (80, 64)) -> EditInputs:
    return EditInputs(
        images=[Image.new("RGB", size, color)],
        prompt=prompt,
        seed=seed,
        num_inference_steps=2,
        negative_prompt="blurry",
        width=96,
        height=64,
    )


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_batched_run_matches_each_run_alone(runner: EditRunner) -> None:
    batch = [
        _inputs("make it blue", 1, (200, 40, 40)),
        _inputs("a cat wearing a tall red hat, watercolor", 2, (40, 200, 40)),  # a longer prompt: padded
        _inputs("x", 3, (40, 40, 200), size=(160, 128)),  # same aspect ratio: same condition size
    ]
    steps: list[int] = []
    together = runner.run_batch(batch, lambda step, total: steps.append(step) is None)
    assert steps == [0, 1, 2]
    alone = [runner(inputs) for inputs in batch]
    for a, b in zip(alone, together, strict=True):
        assert b.images[0].size == (96, 64)
        assert _max_diff(a.images[0], b.images[0]) <= 1  # rounding only: same noise, same conditioning
    # Different seeds and prompts stay different inside one batch.
    assert _max_diff(together[0].images[0], together[1].images[0]) > 10


def test_batch_signature_separates_what_cannot_share_a_call(runner: EditRunner) -> None:
    base = _inputs("a", 1, (0, 0, 0))
    sig = runner.batch_signature(base)
    assert sig is not None and sig[0] == condition_size(base.images[0])
    assert runner.batch_signature(_inputs("b", 9, (9, 9, 9))) == sig  # prompt, seed and pixels may differ
    assert runner.batch_signature(_inputs("a", 1, (0, 0, 0), size=(64, 80))) != sig  # another aspect ratio
    assert runner.batch_signature(EditInputs(**{**base.__dict__, "num_inference_steps": 3})) != sig
    assert runner.batch_signature(EditInputs(**{**base.__dict__, "loras": [object()]})) is None  # type: ignore[list-item]
    assert runner.batch_signature(EditInputs(**{**base.__dict__, "num_images": 2})) is None
    with pytest.raises(ValueError, match="cannot share"):
        runner.run_batch([base, _inputs("a", 1, (0, 0, 0), size=(64, 80))])


def test_batch_key_at_submit_time() -> None:
    edit, plus = get_variant("edit"), get_variant("edit-plus")
    params = JobParams(
        prompt="x",
        images=(ImageRef(key="a"),),
        seed=1,
        width=512,
        height=512,
        num_inference_steps=30,
        true_cfg_scale=4.0,
        negative_prompt=" ",
    )
    key = params.batch_key(edit)
    assert key and replace(params, images=(ImageRef(url="http://b"),), prompt="other", seed=2).batch_key(edit) == key
    assert replace(params, width=640).batch_key(edit) != key
    assert replace(params, loras=(LoraRef("x", 1.0),)).batch_key(edit) is None
    assert params.batch_key(plus) is None  # multi-image pipelines read a list as one prompt's images


# --- through the real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def batching(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Any]) -> Iterator[ServerProc]:
    data = tmp_path_factory.mktemp("batching")
    env = server_env(
        data,
        tiny_models["edit"],
        QWEN_EDIT_BATCH_MAX_SIZE="3",
        QWEN_EDIT_BATCH_WAIT_MS="4000",
        QWEN_EDIT_LOG_JSON="true",
    )
    srv = ServerProc(data_dir=data, env=env).start()
    yield srv
    srv.stop()


def _batches(srv: ServerProc) -> list[list[str]]:
    assert srv.log_path is not None
    found = []
    for line in srv.log_path.read_text().splitlines():
        if line.startswith("{") and '"batch started"' in line:
            found.append(json.loads(line)["jobs"])
    return found


@pytest.mark.e2e
def test_server_batches_compatible_jobs_and_keeps_each_result(
    batching: ServerProc, runner: EditRunner, tiny_models: dict[str, Any]
) -> None:
    image = png_bytes((80, 64))
    body = {"image": data_uri(image), "size": "256*256", "output_format": "png"}
    ids = [batching.submit({**body, "prompt": f"edit {i}", "seed": 10 + i}).json()["data"]["id"] for i in range(3)]
    assert all(ids)
    other = batching.submit({**body, "prompt": "another size", "size": "256*320"}).json()["data"]["id"]
    done = {pid: batching.wait(pid) for pid in [*ids, other]}
    assert all(d["status"] == "completed" for d in done.values()), done
    assert sorted(ids) in [sorted(b) for b in _batches(batching)]
    assert not any(other in b for b in _batches(batching))
    # Each output is the one the pipeline gives that job alone (same seed), up to rounding.
    for i, pid in enumerate(ids):
        got = Image.open(io.BytesIO(httpx.get(done[pid]["outputs"][0], timeout=10).content)).convert("RGB")
        alone = runner(
            EditInputs(
                images=[Image.open(io.BytesIO(image)).convert("RGB")],
                prompt=f"edit {i}",
                seed=10 + i,
                num_inference_steps=2,
                width=256,
                height=256,
            )
        )
        assert _max_diff(got, alone.images[0].convert("RGB")) <= 1


@pytest.mark.e2e
def test_cancelling_one_job_of_a_batch_leaves_the_others(batching: ServerProc) -> None:
    body = {"image": data_uri(png_bytes()), "size": "256*256", "num_inference_steps": 12}
    ids = [batching.submit({**body, "prompt": f"long {i}"}).json()["data"]["id"] for i in range(3)]
    deadline = time.monotonic() + 180
    while batching.result(ids[1]).get("progress", {}).get("step", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = httpx.post(f"{batching.url}/api/v3/predictions/{ids[1]}/cancel", headers=batching.headers, timeout=10)
    assert r.status_code == 200
    cancelled = batching.wait(ids[1])
    assert cancelled["status"] == "failed" and cancelled["error"] == "Cancelled by the client while running."
    for pid in (ids[0], ids[2]):
        assert batching.wait(pid)["status"] == "completed"
    assert sorted(ids) in [sorted(b) for b in _batches(batching)]
