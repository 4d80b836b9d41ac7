"""The real Qwen-Image-Edit architecture, from the real configs, without the weights.

Timing and memory do not depend on the weights' values, so the GPU benchmarks build the real
components with random weights, and the memory planner reads parameter sizes and module structure
off the same components built on the meta device (no memory at all). Three scales:

    real    the Hub repositories' configs: a 60-layer 20.4 B transformer, Qwen2.5-VL-7B, the Qwen VAE
    smoke   the real widths with one or two layers per component (and a small vocabulary, a slim
            VAE), for running every benchmark phase on a CPU in minutes
    tiny    not built here: ``weights/tiny.py``'s model folder, the tests' one

The tokenizer and processor are always the tiny ones (the real ones are not reachable offline;
their ids only have to agree with the text encoder's config, which they do by construction).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.registry import Variant

Scale = Literal["real", "smoke"]

# transformer/config.json of Qwen/Qwen-Image-Edit (2509 and 2511 share it; 2511 adds zero_cond_t).
TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
# text_encoder/config.json: Qwen2.5-VL-7B-Instruct.
TEXT: dict[str, Any] = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rope_theta": 1000000.0,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "tie_word_embeddings": False,
}
VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "window_size": 112,
}
# vae/config.json is AutoencoderKLQwenImage's defaults (base_dim 96, z_dim 16): 127 M parameters.
VAE: dict[str, Any] = {}

# Smoke: every width real, depth cut to one layer (the CPU pays per layer, not per width), the vocabulary the
# tiny tokenizer's (the real one's 545 M-parameter embedding changes nothing but the build time),
# and a VAE at the real geometry but 8 channels (the real one takes a minute per 1 MP on 2 cores).
SMOKE: dict[str, dict[str, Any]] = {
    "transformer": {"num_layers": 1},
    "text": {"num_hidden_layers": 1},
    "vision": {"depth": 1, "fullatt_block_indexes": [0]},
    "vae": {"base_dim": 8, "num_res_blocks": 1},
}


@dataclass(frozen=True)
class Components:
    transformer: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    processor: Any


def configs(variant: Variant, scale: Scale, vocab_size: int) -> dict[str, dict[str, Any]]:
    """The component configs at ``scale`` (``vocab_size``: the smoke scale's tokenizer's)."""
    smoke = scale == "smoke"
    return {
        "transformer": {**TRANSFORMER, **(SMOKE["transformer"] if smoke else {}), "zero_cond_t": variant.zero_cond_t},
        "text": {**TEXT, **({**SMOKE["text"], "vocab_size": vocab_size} if smoke else {})},
        "vision": {**VISION, **(SMOKE["vision"] if smoke else {})},
        "vae": {**VAE, **(SMOKE["vae"] if smoke else {})},
    }


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence what building random components makes the libraries say to no purpose: diffusers'
    advice on casting with ``.to`` (there are no stored weights to keep in fp32), its torchao
    checkpoint-format notice, and torch's notes on the Enums torchao registers."""
    import diffusers
    import transformers

    names = ("torch.utils._pytree", "diffusers", "transformers")
    levels = [logging.getLogger(n).level for n in names]
    before = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(before[0])
        transformers.utils.logging.set_verbosity(before[1])
        for n, level in zip(names, levels, strict=True):
            logging.getLogger(n).setLevel(level)


def build_components(
    variant: Variant,
    scale: Scale = "real",
    *,
    device: str = "meta",
    dtype: Any = None,
    devices: dict[str, str] | None = None,
) -> Components:
    """The components at ``scale``, their parameters on ``device`` (or per component:
    ``devices={"transformer": "cuda", ...}``) in ``dtype`` with random values (N(0, 0.02)), or
    without any storage on ``device="meta"`` (what the planner reads).

    Parameters are created empty on the meta device and materialised one at a time, straight on the
    target device: no full-size copy on the host, no fp32 copy of a bf16 model. Buffers and the
    rotary tables (plain attributes) are built for real, on the CPU, and move with ``.to``.
    """
    with quiet_libraries():
        return _build(variant, scale, device, dtype, devices)


def _build(variant: Variant, scale: Scale, device: str, dtype: Any, devices: dict[str, str] | None) -> Components:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from weights.tiny import SPECIAL_TOKENS, build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}  # type: ignore[arg-type]
    cfg = configs(variant, scale, len(tokenizer))
    dtype = dtype or torch.bfloat16
    with init_empty_weights(include_buffers=False):
        transformer = QwenImageTransformer2DModel(**cfg["transformer"])
        text_config = {**cfg["text"], "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config=text_config,
                vision_config=cfg["vision"],
                image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"],
            )
        )
        vae = AutoencoderKLQwenImage(**cfg["vae"])
    placed = {"transformer": device, "text_encoder": device, "vae": device, **(devices or {})}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        if placed[name] == "meta":
            module.to(dtype)
        else:
            materialise(module, placed[name], dtype, generator)
    return Components(transformer, text_encoder, vae, tokenizer, build_processor(tokenizer))


def materialise(module: Any, device: str, dtype: Any, generator: Any) -> None:
    """Meta parameters -> random ones on ``device``; real buffers -> ``device``."""
    import torch

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if param.device.type == "meta":
                data = torch.empty(param.shape, dtype=dtype, device=device)
                if device == "cpu":
                    data.normal_(0.0, 0.02, generator=generator)
                else:
                    data.normal_(0.0, 0.02)
            else:
                data = param.data.to(device=device, dtype=dtype)
            sub._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = buf.to(device=device, dtype=dtype if buf.is_floating_point() else buf.dtype)


def build_pipeline(
    variant: Variant, scale: Scale = "real", *, device: str, dtype: Any = None, devices: dict[str, str] | None = None
) -> Any:
    """A whole pipeline of ``variant`` at ``scale`` with random weights on ``device`` (or ``devices``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from weights.tiny import SCHEDULER_CONFIG

    parts = build_components(variant, scale, device=device, dtype=dtype, devices=devices)
    pipe = variant.pipeline_class()(
        transformer=parts.transformer,
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        processor=parts.processor,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),  # type: ignore[arg-type]
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
