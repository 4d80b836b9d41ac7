"""pipelines/loader.py: the device and dtype a model loads with, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.loader import ModelLoadError, load_pipeline, resolve_device, resolve_dtype
from pipelines.registry import get_variant

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")


@needs_no_gpu
def test_auto_falls_back_to_the_cpu_only_for_a_small_model() -> None:
    assert resolve_device("auto") == "cpu"
    # The real 20 B model on a CPU (about 115 GB of RAM, minutes a step) is refused, saying why
    # torch sees no GPU and how to ask for the CPU anyway.
    with pytest.raises(ModelLoadError) as err:
        resolve_device("auto", real_weights=True)
    message = str(err.value)
    assert "no usable GPU" in message and "QWEN_EDIT_DEVICE=cpu" in message
    assert f"torch {torch.__version__}" in message or "CPU-only build" in message
    assert resolve_device("cpu", real_weights=True) == "cpu"  # asked for explicitly


@needs_no_gpu
def test_an_explicit_gpu_that_is_not_there_is_an_error() -> None:
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_dtypes() -> None:
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="overflows in fp16"):
        resolve_dtype("float16", "cuda")


def test_the_wrong_variant_for_the_weights_is_named(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="QWEN_EDIT_VARIANT"):
        load_pipeline(str(tiny_models["edit"]), get_variant("edit-plus"), device="cpu", dtype=torch.float32)


def test_settings_refuse_float16_at_start_up() -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError, match="overflows in fp16"):
        Settings(dtype="float16")
