"""pipelines/speed.py on the tiny models: batched CFG matches the two-pass path, and every other
setting either runs on the CPU or is skipped with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipelines.loader import load_pipeline
from pipelines.registry import get_variant
from pipelines.runner import EditInputs, EditRunner
from pipelines.speed import (
    BatchedCFG,
    SpeedConfig,
    SpeedReport,
    apply_speed,
    pad_text,
    reset_attention_backend,
    set_attention_backend,
)


def _load(folder: Path, variant: str) -> tuple[Any, EditRunner]:
    import torch

    v = get_variant(variant)
    pipe = load_pipeline(str(folder), v, device="cpu", dtype=torch.float32)
    return pipe, EditRunner(pipe, v, "cpu")


def _inputs(**kw: Any) -> EditInputs:
    base: dict[str, Any] = dict(
        images=[Image.new("RGB", (64, 64), (200, 30, 30))],
        prompt="turn the red square into a long row of small blue cats",  # longer than the negative
        negative_prompt="blurry",
        seed=3,
        num_inference_steps=2,
        width=64,
        height=64,
    )
    base.update(kw)
    return EditInputs(**base)


def _pixels(runner: EditRunner, inputs: EditInputs) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in runner(inputs).images])


@pytest.fixture(scope="module")
def tiny_plus(tiny_family: dict[str, Path]) -> Path:
    return tiny_family["edit-plus"]


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
@pytest.mark.parametrize("variant", ["edit", "edit-plus"])
def test_batched_cfg_matches_two_passes(variant: str, tiny_models: dict[str, Path], request: Any) -> None:
    folder = tiny_models["edit"] if variant == "edit" else request.getfixturevalue("tiny_plus")
    pipe, runner = _load(folder, variant)
    inputs = _inputs(num_images=2) if variant == "edit" else _inputs()
    plain = _pixels(runner, inputs)
    hook = BatchedCFG.install(pipe)
    batched = _pixels(runner, inputs)
    assert hook.batched_calls == inputs.num_inference_steps  # one batch-2 forward a step, really taken
    assert np.abs(plain - batched).max() <= 1  # within 1/255
    # Without CFG nothing is batched, and the outputs are the unbatched ones.
    no_cfg = _inputs(true_cfg_scale=1.0)
    before = hook.batched_calls
    with_hook = _pixels(runner, no_cfg)
    assert hook.batched_calls == before
    BatchedCFG.uninstall(pipe)
    assert np.abs(_pixels(runner, no_cfg) - with_hook).max() <= 1


def test_batched_cfg_is_off_by_default() -> None:
    """Until a GPU measures it faster (benchmarks/gpu.py phase 1): its mask keeps SDPA off flash."""
    from server.settings import Settings

    assert SpeedConfig().batched_cfg is False
    assert SpeedConfig.from_settings(Settings()).batched_cfg is False


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_batched_cfg_on_a_backend_that_refuses_masks_runs_two_passes(
    tiny_models: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    """flash, _flash_3, _native_flash and sage raise on any attention mask; prompts of unequal length
    need one. The first such step finds out, and the steps run as two passes: no failed job."""
    pipe, runner = _load(tiny_models["edit"], "edit")
    report = SpeedReport()
    set_attention_backend(pipe.transformer, "_native_flash", report)
    assert report.applied == ["attention_backend=_native_flash"]
    request.addfinalizer(lambda: reset_attention_backend(pipe.transformer))  # diffusers' setting is process-wide
    inputs = _inputs()  # the prompt is longer than the negative one
    plain = _pixels(runner, inputs)
    hook = BatchedCFG.install(pipe)
    batched = _pixels(runner, inputs)
    assert hook.masks_supported is False and hook.batched_calls == 0
    assert np.abs(plain - batched).max() <= 1
    # Prompts of equal length need no mask: batched on this backend too.
    same = _inputs(prompt="blurry", negative_prompt="blurry")
    assert np.abs(_pixels(runner, same) - _pixels(runner, same)).max() == 0
    assert hook.batched_calls == same.num_inference_steps * 2


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_batched_cfg_survives_group_offloading_and_lora_loads(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The worker's order: placement, then batched CFG, then a LoRA pinned. Loading a LoRA makes
    diffusers take group offloading off and put it back; the hook (in the model's hook registry,
    not a replaced ``forward``) stays, and the offloading too."""
    from pipelines.lora import LoraManager, LoraRequest
    from pipelines.memory import MemoryPlan, apply_plan
    from pipelines.speed import offloaded
    from tests.support import build_tiny_lora

    v = get_variant("edit")
    reference, _ = _load(tiny_models["edit"], "edit")
    lora = build_tiny_lora(tmp_path)
    ref_manager = LoraManager(reference)
    ref_manager.pin(LoraRequest(str(lora), 0.5))
    expected = _pixels(EditRunner(reference, v, "cpu", ref_manager), _inputs())

    pipe, _ = _load(tiny_models["edit"], "edit")
    apply_plan(pipe, MemoryPlan("group-block", "none", None, "test"), "cpu")
    hook = BatchedCFG.install(pipe)
    manager = LoraManager(pipe)
    manager.pin(LoraRequest(str(lora), 0.5))
    assert offloaded(pipe.transformer)
    got = _pixels(EditRunner(pipe, v, "cpu", manager), _inputs())
    assert hook.batched_calls == 2  # still batching, after the LoRA load
    assert np.abs(got - expected).max() <= 1


def test_pad_text_marks_padding() -> None:
    import torch

    embeds, mask = pad_text(torch.ones(2, 3, 4), None, 5)
    assert embeds.shape == (2, 5, 4) and embeds[:, 3:].abs().sum() == 0
    assert mask.tolist() == [[True, True, True, False, False]] * 2


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_attention_backend_falls_back_with_reason(tiny_models: dict[str, Path]) -> None:
    pipe, runner = _load(tiny_models["edit"], "edit")
    report = SpeedReport()
    set_attention_backend(pipe.transformer, "_flash_3", report)  # no FlashAttention-3 on a CPU
    assert "attention_backend" in report.skipped and "_flash_3" in report.skipped["attention_backend"]
    report = SpeedReport()
    set_attention_backend(pipe.transformer, "native", report)
    assert report.applied == ["attention_backend=native"]
    assert runner(_inputs()).images[0].size == (64, 64)
    reset_attention_backend(pipe.transformer)


def test_fp8_is_skipped_on_cpu_with_reason(tiny_models: dict[str, Path]) -> None:
    pipe, _ = _load(tiny_models["edit"], "edit")
    report = apply_speed(pipe, SpeedConfig(batched_cfg=False, fp8=True), "cpu")
    assert "fp8" in report.skipped and "CUDA" in report.skipped["fp8"]


@pytest.mark.e2e  # inductor compiles in subprocesses: tens of seconds of C++ builds on a CPU
def test_regional_compile_runs_on_cpu(tiny_models: dict[str, Path]) -> None:
    pipe, runner = _load(tiny_models["edit"], "edit")
    report = apply_speed(pipe, SpeedConfig(batched_cfg=True, compile=True), "cpu")
    assert "compile=repeated_blocks" in report.applied and "batched_cfg" in report.applied
    images = runner(_inputs(num_inference_steps=2)).images
    assert images[0].size == (64, 64)
    assert np.asarray(images[0]).std() > 0


@pytest.mark.e2e  # inductor, as above
def test_regional_compile_with_group_offloading_runs(tiny_models: dict[str, Path]) -> None:
    """A full graph cannot trace diffusers' compiler-disabled offload hooks (every job would fail):
    offloaded blocks compile with graph breaks at the hooks."""
    from pipelines.memory import MemoryPlan, apply_plan

    pipe, runner = _load(tiny_models["edit"], "edit")
    plain = _pixels(runner, _inputs(true_cfg_scale=1.0))
    apply_plan(pipe, MemoryPlan("group-block", "none", None, "test"), "cpu")
    report = apply_speed(pipe, SpeedConfig(compile=True), "cpu")
    assert "compile=repeated_blocks (graph breaks at the offload hooks)" in report.applied
    assert np.abs(_pixels(runner, _inputs(true_cfg_scale=1.0)) - plain).max() <= 1


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_step_cache_runs_or_says_why(tiny_models: dict[str, Path]) -> None:
    pipe, runner = _load(tiny_models["edit"], "edit")
    report = apply_speed(pipe, SpeedConfig(batched_cfg=True, step_cache=True, step_cache_warmup_steps=1), "cpu")
    if "step_cache" in report.skipped:
        pytest.skip(f"cache-dit unusable here: {report.skipped['step_cache']}")
    assert "step_cache=dbcache" in report.applied
    assert "batched_cfg" in report.skipped  # the two do not stack
    assert runner(_inputs(num_inference_steps=4)).images[0].size == (64, 64)
