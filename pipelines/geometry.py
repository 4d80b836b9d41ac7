"""The sizes a Qwen-Image-Edit pipeline derives from its inputs, computed without torch.

The pipelines resize every input twice (for the VAE and for Qwen2.5-VL), pick the output size from
the input when none is given, and lay image and text tokens on one rotary-position table of 4096
rows. These functions mirror diffusers 0.42's and transformers' own (``calculate_dimensions``,
``smart_resize``; tests/test_geometry.py holds them to the originals), so that the API can refuse
at submit, and the runner before any tensor moves, what the pipeline would fail on late:
an image too thin to resize, or a prompt longer than the table leaves room for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipelines.errors import PipelineInputError
from pipelines.registry import Variant

VAE_AREA = 1024 * 1024  # every pipeline encodes its inputs at about this many pixels
PLUS_VL_AREA = 384 * 384  # ...and Plus/2511 show Qwen2.5-VL a copy of about this many
LATENT_MULTIPLE = 16  # the VAE's 8x times the transformer's 2x2 patches
ROPE_POSITIONS = 4096  # rows of QwenEmbedRope's table, shared by image and text positions
VL_FACTOR = 28  # Qwen2.5-VL: 14-pixel patches, merged 2x2
VL_MAX_RATIO = 200  # Qwen2.5-VL refuses images more elongated than this
VL_MIN_PIXELS = 3136
VL_MAX_PIXELS = 12845056
TEMPLATE_DROP = 64  # the pipelines drop this many leading template tokens from the encoding

Size = tuple[int, int]  # (width, height)


def calculate_dimensions(target_area: int, ratio: float) -> Size:
    """diffusers' ``calculate_dimensions``: about ``target_area`` pixels at ``ratio``, sides multiples of 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def smart_resize(height: int, width: int, min_pixels: int = VL_MIN_PIXELS, max_pixels: int = VL_MAX_PIXELS) -> Size:
    """transformers' Qwen2-VL ``smart_resize``, as (width, height)."""
    if min(height, width) <= 0 or max(height, width) / min(height, width) > VL_MAX_RATIO:
        raise PipelineInputError(
            f"the input image is too elongated for Qwen2.5-VL ({width}x{height} after resizing; "
            f"at most {VL_MAX_RATIO}:1)"
        )
    h_bar = round(height / VL_FACTOR) * VL_FACTOR
    w_bar = round(width / VL_FACTOR) * VL_FACTOR
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(VL_FACTOR, math.floor(height / beta / VL_FACTOR) * VL_FACTOR)
        w_bar = max(VL_FACTOR, math.floor(width / beta / VL_FACTOR) * VL_FACTOR)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / VL_FACTOR) * VL_FACTOR
        w_bar = math.ceil(width * beta / VL_FACTOR) * VL_FACTOR
    return w_bar, h_bar


def vae_sizes(images: Sequence[Size]) -> list[Size]:
    """The size each input is encoded at (the Edit condition, or each Plus/2511 reference)."""
    return [calculate_dimensions(VAE_AREA, w / h) for w, h in images]


def vl_sizes(variant: Variant, images: Sequence[Size]) -> list[Size]:
    """The size of each image Qwen2.5-VL reads with the prompt."""
    area = PLUS_VL_AREA if variant.multi_image else VAE_AREA
    return [calculate_dimensions(area, w / h) for w, h in images]


def output_size(variant: Variant, images: Sequence[Size], width: int | None, height: int | None) -> Size:
    """The size the pipeline generates at (before the runner resizes to exactly ``width``x``height``)."""
    w0, h0 = images[-1] if variant.multi_image else images[0]
    calc_w, calc_h = calculate_dimensions(VAE_AREA, w0 / h0)
    w, h = width or calc_w, height or calc_h
    return w // LATENT_MULTIPLE * LATENT_MULTIPLE, h // LATENT_MULTIPLE * LATENT_MULTIPLE


def check_images(variant: Variant, images: Sequence[Size], width: int | None = None, height: int | None = None) -> None:
    """Refuse inputs the pipeline cannot resize (a side that rounds to nothing, an image too thin
    for Qwen2.5-VL): PipelineInputError with what to change."""
    for (w, h), (vw, vh), (lw, lh) in zip(images, vae_sizes(images), vl_sizes(variant, images), strict=True):
        if min(w, h) <= 0 or min(vw, vh) < LATENT_MULTIPLE or min(lw, lh) <= 0:
            raise PipelineInputError(f"the input image is too elongated to edit ({w}x{h}); crop it closer to square")
        smart_resize(lh, lw)
    out_w, out_h = output_size(variant, images, width, height)
    if min(out_w, out_h) < LATENT_MULTIPLE:
        raise PipelineInputError(f"the output would be {out_w}x{out_h}: give a size, or a less elongated image")


def vision_tokens(variant: Variant, images: Sequence[Size]) -> int:
    """Image tokens Qwen2.5-VL adds to the prompt's encoding."""
    total = 0
    for w, h in vl_sizes(variant, images):
        rw, rh = smart_resize(h, w)
        total += (rw // 14) * (rh // 14) // 4
    return total


def text_budget(variant: Variant, images: Sequence[Size], width: int | None, height: int | None) -> int:
    """Rows of the rotary table left for the prompt's encoding after the image positions."""
    out_w, out_h = output_size(variant, images, width, height)
    latents = [(out_w, out_h), *vae_sizes(images)]
    largest = max(max(w // LATENT_MULTIPLE // 2, h // LATENT_MULTIPLE // 2) for w, h in latents)
    return ROPE_POSITIONS - largest
