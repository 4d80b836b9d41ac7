"""The tiny model is built offline, deterministically, and loads through the real from_pretrained path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.loader import ModelLoadError, check_model_folder, load_pipeline
from pipelines.registry import get_variant
from pipelines.runner import EditInputs, EditRunner
from tests.support import build_tiny
from weights.tiny import SPECIAL_TOKENS, build_tiny_model


def test_tiny_folder_has_the_real_layout(tiny_models: dict[str, Path]) -> None:
    folder = tiny_models["edit"]
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        assert (folder / sub).is_dir(), sub
    assert (folder / "model_index.json").is_file()


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_two_builds_give_the_same_pixels(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    other = build_tiny_model(tmp_path / "again", "edit")
    variant = get_variant("edit")
    outs = []
    for folder in (tiny_models["edit"], other):
        pipe = load_pipeline(str(folder), variant, device="cpu", dtype=__import__("torch").float32)
        runner = EditRunner(pipe, variant, "cpu")
        img = Image.new("RGB", (64, 48), (10, 200, 30))
        result = runner(
            EditInputs(images=[img], prompt="paint it", seed=42, num_inference_steps=2, width=256, height=256)
        )
        outs.append(np.asarray(result.images[0], dtype=np.int16))
    assert outs[0].shape == (256, 256, 3)
    assert np.abs(outs[0] - outs[1]).max() <= 1  # within 1/255


def test_tokenizer_keeps_the_real_special_tokens_in_order(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["edit"] / "tokenizer")
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    encoded = tok("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")["input_ids"]
    assert tok.convert_tokens_to_ids("<|image_pad|>") in encoded


def test_wrong_folder_fails_clearly(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    import pytest

    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_folder(str(tmp_path / "nothing"), get_variant("edit"))
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        check_model_folder(str(tmp_path), get_variant("edit"))
    with pytest.raises(ModelLoadError, match="QwenImageEditPlusPipeline"):
        check_model_folder(str(tiny_models["edit"]), get_variant("edit-plus"))


@pytest.mark.e2e
def test_cli_builds_a_tiny_model_folder(tmp_path: Path) -> None:
    """`qwen-edit weights tiny DIR`, as a user runs it, gives a folder the worker loads."""
    folder = build_tiny(tmp_path / "cli", "edit")
    assert (folder / "model_index.json").is_file() and (folder / "TINY_MODEL.txt").is_file()
    check_model_folder(str(folder), get_variant("edit"))
