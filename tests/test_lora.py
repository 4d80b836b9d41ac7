"""pipelines/lora.py on the tiny model: a LoRA changes the output, and turning it off restores it exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.lora import LoraError, LoraManager, LoraRequest
from pipelines.registry import get_variant
from pipelines.runner import EditInputs, EditRunner
from tests.support import build_tiny_lora
from weights.tiny import build_tiny_pipeline


def _inputs(loras: list[LoraRequest] | None = None) -> EditInputs:
    return EditInputs(
        images=[Image.new("RGB", (64, 64), (200, 40, 40))],
        prompt="make it blue",
        seed=7,
        num_inference_steps=2,
        true_cfg_scale=1.0,
        width=64,
        height=64,
        loras=loras or [],
    )


def _pixels(runner: EditRunner, loras: list[LoraRequest] | None = None) -> np.ndarray:
    return np.asarray(runner(_inputs(loras)).images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lora(tmp_path_factory.mktemp("lora"))


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_lora_changes_output_and_unloading_restores_base_exactly(lora_file: Path, tmp_path: Path) -> None:
    pipe = build_tiny_pipeline("edit")
    manager = LoraManager(pipe, max_loaded=1)
    runner = EditRunner(pipe, get_variant("edit"), "cpu", manager)
    base = _pixels(runner)
    with_lora = _pixels(runner, [LoraRequest(str(lora_file), 1.0)])
    assert np.abs(with_lora - base).max() > 0, "the LoRA did not change the output"
    assert np.array_equal(_pixels(runner), base), "the base output did not come back exactly"
    # Loaded once, kept (LRU); a second job reuses it and gives the same pixels.
    assert list(manager.loaded.values()) == [str(lora_file)]
    assert np.array_equal(_pixels(runner, [LoraRequest(str(lora_file), 1.0)]), with_lora)
    # Scale 0 is the base model.
    assert np.array_equal(_pixels(runner, [LoraRequest(str(lora_file), 0.0)]), base)


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_lru_evicts_the_oldest_adapter(lora_file: Path, tmp_path: Path) -> None:
    pipe = build_tiny_pipeline("edit")
    manager = LoraManager(pipe, max_loaded=1)
    other = tmp_path / "copy.safetensors"
    other.write_bytes(lora_file.read_bytes())
    runner = EditRunner(pipe, get_variant("edit"), "cpu", manager)
    base = _pixels(runner)
    _pixels(runner, [LoraRequest(str(lora_file))])
    _pixels(runner, [LoraRequest(str(other))])
    assert list(manager.loaded.values()) == [str(other)]
    assert pipe.get_list_adapters() == {"transformer": list(manager.loaded)}
    assert np.array_equal(_pixels(runner), base)


def test_a_file_that_is_no_lora_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    manager = LoraManager(build_tiny_pipeline("edit"))
    with pytest.raises(LoraError, match="could not load LoRA"), manager.applied([LoraRequest(str(junk))]):
        pass


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_bare_transformer_keys_load(lora_file: Path, tmp_path: Path) -> None:
    """PEFT-style files that name the transformer's layers without the ``transformer.`` prefix."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora_file))
    bare = tmp_path / "bare.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, str(bare))
    assert all(k.startswith("transformer_blocks.") for k in load_file(str(bare)))
    pipe = build_tiny_pipeline("edit")
    runner = EditRunner(pipe, get_variant("edit"), "cpu", LoraManager(pipe))
    prefixed = _pixels(runner, [LoraRequest(str(lora_file))])
    assert np.array_equal(_pixels(runner, [LoraRequest(str(bare))]), prefixed)


def test_a_lora_for_another_model_is_an_error_not_a_silent_no_op(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(4, 8),
            "unet.down_blocks.0.attentions.0.to_q.lora_B.weight": torch.zeros(8, 4),
        },
        str(other),
    )
    pipe = build_tiny_pipeline("edit")
    manager = LoraManager(pipe)
    with (
        pytest.raises(LoraError, match="no weights for this model's transformer"),
        manager.applied([LoraRequest(str(other))]),
    ):
        pass
    assert manager.loaded == {} and pipe.get_list_adapters().get("transformer", []) == []  # no phantom adapter


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_a_pinned_lora_can_be_fused_into_the_weights(lora_file: Path) -> None:
    """Lightning's permanent LoRA: fused, the same pixels as the adapter, and no adapter path left."""
    pipe = build_tiny_pipeline("edit")
    runner = EditRunner(pipe, get_variant("edit"), "cpu", LoraManager(pipe))
    with_adapter = _pixels(runner, [LoraRequest(str(lora_file), 0.7)])

    fused_pipe = build_tiny_pipeline("edit")
    manager = LoraManager(fused_pipe)
    manager.pin(LoraRequest(str(lora_file), 0.7), fuse=True)
    assert manager.fused == [str(lora_file)] and manager.loaded == {} and manager.pinned == {}
    assert fused_pipe.get_list_adapters() == {}
    assert not any("lora" in name for name, _ in fused_pipe.transformer.named_modules())
    fused = _pixels(EditRunner(fused_pipe, get_variant("edit"), "cpu", manager))
    assert np.abs(fused - with_adapter).max() <= 1
