"""The catalog: every model this server serves, with its request schema. One source of truth for
every wire shape that lists models (the v3 ``GET /api/v3/models`` of the vendor's CLI, MCP server
and desktop app; other renderers read the same entries).

A model's request schema is derived from ``EditRequest``, the pydantic model that validates its
submits, then narrowed to what this server accepts with its settings: the image field of its
variant, ``loras`` only on the -lora endpoints, the server-side knobs only while
``QWEN_EDIT_ALLOW_OVERRIDES`` holds, the prompt and step bounds of the settings. Never a second
hand-written copy: a field added to ``EditRequest`` shows up here by itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pipelines.registry import Endpoint, endpoint_for, endpoints_of, get_variant
from server.api.schemas import EditRequest
from server.settings import Settings

MODEL_TYPE = "image-to-image"
_OVERRIDES = ("negative_prompt", "num_inference_steps", "true_cfg_scale")
_VARIANT_TEXT = {
    "edit": ("Qwen-Image-Edit", "Edits one image from a text instruction (Qwen-Image-Edit, 20B MMDiT)."),
    "edit-plus": (
        "Qwen-Image-Edit Plus (2509)",
        "Edits or combines up to 3 images from a text instruction (Qwen-Image-Edit-2509).",
    ),
    "edit-2511": (
        "Qwen-Image-Edit 2511",
        "Edits or combines up to 3 images with better consistency (Qwen-Image-Edit-2511).",
    ),
}


@dataclass(frozen=True)
class CatalogEntry:
    """One served model id, independent of any wire shape."""

    model_id: str  # the public id, e.g. wavespeed-ai/qwen-image/edit-lora
    name: str
    description: str
    type: str  # the vendor's modality category
    variant: str  # the family member that runs it
    loras: bool  # a -lora endpoint
    max_images: int
    request_schema: dict[str, Any]  # JSON Schema of the submit body (properties, required, x-order-properties)
    sort_order: int  # catalog position (the vendor's clients sort on it)


def catalog(settings: Settings) -> list[CatalogEntry]:
    """Every model id this server serves, in a stable order."""
    entries = []
    for n, endpoint in enumerate(_served_endpoints(settings)):
        name, description = _VARIANT_TEXT.get(endpoint.variant.name, (endpoint.variant.name, ""))
        if endpoint.loras:
            name += " LoRA"
            description += " With up to 3 LoRA adapters (loras: [{path, scale}])."
        entries.append(
            CatalogEntry(
                model_id=endpoint.model,
                name=name,
                description=description,
                type=MODEL_TYPE,
                variant=endpoint.variant.name,
                loras=endpoint.loras,
                max_images=endpoint.variant.max_images,
                request_schema=request_schema(endpoint, settings),
                sort_order=n + 1,
            )
        )
    return entries


def find(settings: Settings, model_id: str) -> CatalogEntry | None:
    return next((entry for entry in catalog(settings) if entry.model_id == model_id), None)


def _served_endpoints(settings: Settings) -> list[Endpoint]:
    endpoints = []
    for variant in settings.served_variants:
        for model in endpoints_of(get_variant(variant)):
            endpoint = endpoint_for(model)
            assert endpoint is not None  # endpoints_of names family members only
            endpoints.append(endpoint)
    return endpoints


def request_schema(endpoint: Endpoint, settings: Settings) -> dict[str, Any]:
    """``EditRequest``'s JSON Schema as this endpoint accepts it here: references inlined, optional
    fields as their plain type, fields this endpoint ignores or refuses left out."""
    full = EditRequest.model_json_schema()
    defs = full.get("$defs", {})
    props: dict[str, Any] = {name: _plain(_inline(prop, defs)) for name, prop in full["properties"].items()}
    drop = {"image"} if endpoint.variant.multi_image else {"images"}
    if not endpoint.loras:
        drop.add("loras")
    if not settings.allow_overrides:
        drop.update(_OVERRIDES)
    for name in drop:
        props.pop(name, None)
    # The settings narrow what the model alone allows.
    props["prompt"]["maxLength"] = min(
        props["prompt"].get("maxLength", settings.max_prompt_chars), settings.max_prompt_chars
    )
    if "num_inference_steps" in props:
        steps = props["num_inference_steps"]
        steps["maximum"] = min(steps.get("maximum", settings.max_steps), settings.max_steps)
        steps["default"] = settings.default_steps
    if "true_cfg_scale" in props:
        props["true_cfg_scale"]["default"] = settings.default_true_cfg_scale
    if "images" in props:
        props["images"]["maxItems"] = endpoint.variant.max_images
        props["images"]["minItems"] = 1
    image_field = "images" if endpoint.variant.multi_image else "image"
    return {
        "type": "object",
        "properties": props,
        "required": [*full.get("required", []), image_field],
        "x-order-properties": list(props),
    }


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """The schema with every ``$ref`` to ``$defs`` replaced by a copy of its target."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = copy.deepcopy(defs[ref.removeprefix("#/$defs/")])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return _inline({**target, **rest}, defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _plain(prop: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, {type: null}]`` (pydantic's optional field) as X itself, keeping the field's own
    keys (title, description, default): the clients read ``type`` directly."""
    options = prop.get("anyOf")
    if isinstance(options, list):
        real = [o for o in options if o.get("type") != "null"]
        if len(real) == 1 and len(real) < len(options):
            rest = {k: v for k, v in prop.items() if k != "anyOf"}
            if rest.get("default", 0) is None:
                rest.pop("default")
            return {**real[0], **rest}
    return prop
