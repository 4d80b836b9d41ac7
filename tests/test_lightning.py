"""The Lightning preset (pipelines/lightning.py, Settings.preset): few steps, CFG off, the shift-3
FlowMatch scheduler the Lightning LoRAs were distilled with, and the LoRA pinned for every job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.lightning import use_lightning_scheduler
from pipelines.lora import LoraManager, LoraRequest
from pipelines.registry import get_variant
from pipelines.runner import EditInputs, EditRunner
from server.settings import Settings
from tests.support import build_tiny_lora
from weights.tiny import build_tiny_pipeline


def test_preset_sets_steps_and_turns_cfg_off() -> None:
    assert (Settings(preset="lightning-4").default_steps, Settings(preset="lightning-4").default_true_cfg_scale) == (
        4,
        1.0,
    )
    assert Settings(preset="lightning-8").default_steps == 8
    assert Settings().default_true_cfg_scale > 1.0


def test_scheduler_is_a_constant_shift_of_three_whatever_the_size() -> None:
    pipe = build_tiny_pipeline("edit")
    use_lightning_scheduler(pipe)
    base = np.linspace(1.0, 1 / 4, 4)
    expected = 3 * base / (1 + 2 * base)  # shift s: s*t / (1 + (s - 1)*t)
    for image_seq_len in (256, 4096, 8192):
        mu = np.log(3)  # base_shift == max_shift: mu does not depend on the sequence length
        pipe.scheduler.set_timesteps(sigmas=base, mu=mu)
        assert np.allclose(pipe.scheduler.sigmas[:-1].numpy(), expected, atol=1e-6), image_seq_len
        assert float(pipe.scheduler.sigmas[-1]) == 0.0  # no terminal shift: the last step lands on 0


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_pinned_lightning_lora_runs_four_steps_without_cfg(tmp_path: Path) -> None:
    pipe = build_tiny_pipeline("edit")
    use_lightning_scheduler(pipe)
    loras = LoraManager(pipe)
    runner = EditRunner(pipe, get_variant("edit"), "cpu", loras)
    settings = Settings(preset="lightning-4")
    inputs = EditInputs(
        images=[Image.new("RGB", (64, 64), (200, 40, 40))],
        prompt="make it blue",
        seed=5,
        num_inference_steps=settings.default_steps,
        true_cfg_scale=settings.default_true_cfg_scale,
        width=64,
        height=64,
    )
    calls: list[int] = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    base = np.asarray(runner(inputs).images[0], dtype=np.int16)
    assert len(calls) == 4  # one forward a step: CFG off

    loras.pin(LoraRequest(str(build_tiny_lora(tmp_path / "lightning"))))
    steps: list[int] = []
    with_lora = np.asarray(runner(inputs, lambda s, t: steps.append(s) is None).images[0], dtype=np.int16)
    assert steps == [0, 1, 2, 3, 4]
    assert np.abs(with_lora - base).max() > 10  # the pinned adapter is active without being asked for


@pytest.mark.parametrize("preset", ["lightning-4", "lightning-8"])
def test_preset_wins_over_a_configured_default_steps(preset: str) -> None:
    settings = Settings(preset=preset, default_steps=30)  # the preset wins over a stray default
    assert settings.default_steps == int(preset.rsplit("-", 1)[1])
