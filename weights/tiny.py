"""Build tiny, random, offline Qwen-Image-Edit model folders.

The folders have exactly the layout of the real Hub repositories (``model_index.json``,
``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``processor/``, ``scheduler/``),
so the server loads them with the same ``from_pretrained`` call that loads the 20B weights.
Everything is built from fixed seeds, and the tokenizer is trained locally, so no network
access is needed and two builds produce the same pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.registry import Variant, get_variant

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor

# Qwen2.5-VL's 14 special tokens, in the order of their real ids (151643..151656).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The real Qwen-Image scheduler configuration (scheduler/scheduler_config.json on the Hub).
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

_CORPUS = [
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency "
    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n",
    "<|im_end|>\n<|im_start|>assistant\n",
    "Picture 1: Picture 2: Picture 3: ",
    "make the sky blue, add a red hat, turn it into a watercolor painting, remove the background",
    "change the text to say hello, make it night time, a cat wearing sunglasses, studio lighting",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,.;:'\"()[]{}<>-_/\\@#$%^&*+=~`|",
]

TINY_VOCAB_SIZE = 512


def build_tokenizer() -> Qwen2Tokenizer:
    """Train a small byte-level BPE with Qwen2's pre-tokenizer and wrap it in Qwen2Tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2Tokenizer

    # Qwen2Tokenizer's own backend carries the real normaliser and pre-tokenizer: train on it.
    seed_tokenizer = Qwen2Tokenizer()
    backend: Tokenizer = seed_tokenizer.backend_tokenizer
    from tokenizers import pre_tokenizers

    trainer = BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)  # type: ignore[arg-type]
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.model_max_length = 32768
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    """Qwen2VLProcessor from arguments, with the real Qwen2.5-VL image settings."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    mean = [0.48145466, 0.4578275, 0.40821073]
    std = [0.26862954, 0.26130258, 0.27577711]
    image_processor = Qwen2VLImageProcessor(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=mean,
        image_std=std,
    )
    video_processor = Qwen2VLVideoProcessor(
        patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std
    )
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


def build_tiny_pipeline(variant: str | Variant = "edit", seed: int = 0, heads: int = 1):  # type: ignore[no-untyped-def]
    """Build a tiny random pipeline of ``variant`` (an in-memory diffusers pipeline). ``heads``: the
    transformer's attention heads (of 16 dimensions each), enough to split for head-sharded
    parallel layouts (ulysses, tp: pipelines/layout.py)."""
    if heads < 1:
        raise ValueError(f"heads must be at least 1, got {heads}")
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = get_variant(variant) if isinstance(variant, str) else variant
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    ids: dict[str, int] = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}  # type: ignore[arg-type]

    torch.manual_seed(seed)
    # diffusers' test config, but one attention head: an edit's joint attention spans ~4,400 tokens
    # (the 1 MP condition is 4,096 of them), and on a CPU each head's N^2 softmax is most of a
    # step. One head runs a cached tiny edit 2.4x faster, through the same code.
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
        zero_cond_t=spec.zero_cond_t,
    )
    torch.manual_seed(seed)
    z_dim = 4
    # The real VAE's geometry (8x spatial downsampling, so the pipeline's sizes and token counts
    # match the real model's) at a small width: the encoder still sees the ~1 MP resize, and on a
    # CPU its full-resolution layers are most of a tiny edit: two channels there (not eight) run a
    # whole tiny edit 1.5x faster, through the same code.
    vae = AutoencoderKLQwenImage(
        base_dim=2,
        z_dim=z_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer),
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)  # type: ignore[arg-type]
    return spec.pipeline_class()(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
    )


def build_tiny_model(folder: str | Path, variant: str = "edit", seed: int = 0, heads: int = 1) -> Path:
    """Write a tiny ``variant`` model folder to ``folder`` (created if missing) and return it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(variant, seed=seed, heads=heads)
    # Build beside the target and rename: a crash never leaves a half-written model folder.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        staging = Path(tmp) / "model"
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / "TINY_MODEL.txt").write_text(
            f"A tiny random {variant!r} model built by `qwen-edit weights tiny` (seed {seed}, {heads} attention "
            f"head{'s' if heads > 1 else ''}). "
            "It has the real layout and code path but produces noise, not edits.\n"
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    return folder
