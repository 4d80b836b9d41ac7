"""Which member of the Qwen-Image-Edit family serves which v3 endpoint.

Importing this module must stay cheap (no torch): the API process uses it to route requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODEL_PREFIX = "wavespeed-ai/qwen-image/"


@dataclass(frozen=True)
class Variant:
    name: str  # "edit", "edit-plus", "edit-2511"
    hub_repo: str
    pipeline: str  # diffusers class name
    max_images: int  # how many input images one request may carry
    zero_cond_t: bool = False  # Edit-2511's transformer flag

    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline)

    @property
    def multi_image(self) -> bool:
        return self.max_images > 1


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("edit", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", max_images=1),
        Variant("edit-plus", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", max_images=3),
        Variant("edit-2511", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", max_images=3, zero_cond_t=True),
    )
}


@dataclass(frozen=True)
class Endpoint:
    """One public model id, e.g. ``wavespeed-ai/qwen-image/edit-plus-lora``."""

    model: str
    variant: Variant
    loras: bool


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None


def endpoint_for(model: str) -> Endpoint | None:
    """The endpoint of a public model id, or None when the id names no family member."""
    if not model.startswith(MODEL_PREFIX):
        return None
    suffix = model[len(MODEL_PREFIX) :]
    loras = suffix.endswith("-lora")
    name = suffix[: -len("-lora")] if loras else suffix
    variant = VARIANTS.get(name)
    return Endpoint(model=model, variant=variant, loras=loras) if variant else None


def endpoints_of(variant: Variant) -> list[str]:
    base = MODEL_PREFIX + variant.name
    return [base, base + "-lora"]
