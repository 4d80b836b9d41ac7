"""pipelines/memory.py on the CPU: each plan's placement runs a job with the plain pipeline's pixels,
quantization happens at load time, and model-offload says it needs a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.loader import load_pipeline
from pipelines.memory import MemoryPlan, apply_plan, offload_groups_gb, resident_on, streamed
from pipelines.registry import get_variant
from pipelines.runner import EditInputs, EditRunner
from weights.tiny import build_tiny_pipeline


def _run(pipe: object) -> np.ndarray:
    runner = EditRunner(pipe, get_variant("edit"), "cpu")
    inputs = EditInputs(
        images=[Image.new("RGB", (64, 64), (30, 120, 200))],
        prompt="add a hat",
        seed=3,
        num_inference_steps=2,
        true_cfg_scale=1.0,
        width=64,
        height=64,
    )
    return np.asarray(runner(inputs).images[0], dtype=np.int16)


def _plan(mode: str, quantize: str = "none") -> MemoryPlan:
    return MemoryPlan(mode, quantize, None, "test")  # type: ignore[arg-type]


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_each_streamed_mode_runs_a_job_with_the_plain_pixels() -> None:
    base = _run(build_tiny_pipeline("edit"))
    for mode in ("group-block", "group-leaf", "text-encoder-offload"):
        pipe = build_tiny_pipeline("edit")
        apply_plan(pipe, _plan(mode), "cpu")
        # The hooks are installed on exactly the components the plan streams ...
        for name in ("transformer", "text_encoder", "vae"):
            assert bool(offload_groups_gb(getattr(pipe, name))) == (name in streamed(_plan(mode))), (mode, name)
        # ... and a job runs through them with the same pixels as the plain pipeline.
        assert np.abs(_run(pipe) - base).max() <= 1, mode


def test_resident_components_are_loaded_on_the_device() -> None:
    assert resident_on(_plan("full"), "cuda:1") == {"transformer": "cuda:1", "text_encoder": "cuda:1", "vae": "cuda:1"}
    assert resident_on(_plan("text-encoder-offload"), "cuda") == {
        "transformer": "cuda",
        "text_encoder": "cpu",
        "vae": "cuda",
    }
    assert resident_on(_plan("group-block"), "cuda")["transformer"] == "cpu"  # streamed from host RAM
    assert set(resident_on(_plan("model-offload"), "cuda").values()) == {"cpu"}


def test_model_offload_needs_a_gpu() -> None:
    with pytest.raises(RuntimeError, match="needs a GPU"):
        apply_plan(build_tiny_pipeline("edit"), _plan("model-offload"), "cpu")


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_int8_is_applied_while_the_transformer_loads(tiny_models: dict[str, Path]) -> None:
    """Quantized by from_pretrained (torchao through diffusers), before any placement: the blocks'
    linears 8-bit, the embedders and output layer as stored; then placement streams the quantized
    weights."""
    pytest.importorskip("torchao")
    pipe = load_pipeline(
        str(tiny_models["edit"]),
        get_variant("edit"),
        device="cpu",
        dtype=torch.float32,
        memory=_plan("group-block", "int8"),
    )
    block = pipe.transformer.transformer_blocks[0]
    assert type(block.attn.to_q.weight).__name__ == "Int8Tensor"
    assert type(block.img_mod[1].weight).__name__ == "Int8Tensor"
    assert type(pipe.transformer.img_in.weight.data) is torch.Tensor  # kept as stored
    assert type(pipe.transformer.proj_out.weight.data) is torch.Tensor
    assert offload_groups_gb(pipe.transformer)  # and then streamed
    out = _run(pipe)
    assert out.shape == (64, 64, 3) and out.std() > 0


def test_the_applied_plan_is_logged_as_loaded_not_as_the_real_model() -> None:
    """The tiny model on the CPU: the log shows its own few MB and no estimate of the 20B model's peak."""
    from structlog.testing import capture_logs

    pipe = build_tiny_pipeline("edit")
    with capture_logs() as logs:
        apply_plan(pipe, _plan("full"), "cpu")
    (event,) = [e for e in logs if e["event"] == "memory plan applied"]
    assert "estimated_peak_gb" not in event and event["device"] == "cpu"
    assert set(event["loaded"]) == {"transformer", "text_encoder", "vae"}
    assert all(size.endswith(" MB") for size in event["loaded"].values()), event
