"""Request and response models of the v3 wire contract (docs/API.md). What the validators check is
stated in the schema too (lengths, ranges, patterns), so that /openapi.json describes exactly the
requests that are accepted, as far as JSON Schema can say it."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from server.api.examples import (
    PREDICTION_COMPLETED,
    PREDICTION_CREATED,
    PREDICTION_RUNNING,
    UPLOAD_TICKET,
    error_example,
)

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[*xX\u00d7]\s*(\d{1,5})\s*$")  # W*H, WxH or W\u00d7H
MIN_SIDE, MAX_SIDE = 256, 1536
# 256..1536 as a regular expression, for the schema (the validator gives the friendlier message).
_SIDE = r"(?:25[6-9]|2[6-9][0-9]|[3-9][0-9][0-9]|1[0-4][0-9][0-9]|15[0-2][0-9]|153[0-6])"
SIZE_PATTERN = rf"^\s*{_SIDE}\s*[*xX\u00d7]\s*{_SIDE}\s*$"
MAX_PROMPT_CHARS = 4000  # the schema's bound; QWEN_EDIT_MAX_PROMPT_CHARS may lower it
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # the schema's bound; QWEN_EDIT_MAX_IMAGE_BYTES may lower it


def parse_size(value: str) -> tuple[int, int]:
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"size must look like 'W*H' (e.g. '1024*1024'), got {value!r}")
    width, height = int(match.group(1)), int(match.group(2))
    for side, name in ((width, "width"), (height, "height")):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"size {name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {side}")
    return width, height


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    path: Annotated[str, Field(min_length=1, max_length=2048)]
    scale: Annotated[float, Field(ge=0.0, le=4.0)] = 1.0


class EditRequest(BaseModel):
    """Body of ``POST /api/v3/wavespeed-ai/qwen-image/edit`` and its siblings. Unknown fields are ignored."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "Turn the sky into a sunset",
                    "image": "https://example.com/photo.jpg",
                    "size": "1024*1024",
                    "seed": -1,
                    "output_format": "jpeg",
                    "enable_base64_output": False,
                    "enable_sync_mode": False,
                }
            ]
        },
    )

    prompt: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_PROMPT_CHARS,
            description="The edit instruction.",
            json_schema_extra={"pattern": r"\S"},  # not only whitespace
        ),
    ]
    image: Annotated[
        str | None,
        Field(description="http(s) URL, data:image/...;base64 URI, bare base64, or an upload's download_url."),
    ] = None
    images: Annotated[
        list[str] | None, Field(description="Edit-Plus and 2511: up to 3 input images, same forms as `image`.")
    ] = None
    size: Annotated[
        str | None,
        Field(
            description="Output 'W*H', 256..1536 each side. Default: follow the input.",
            json_schema_extra={"pattern": SIZE_PATTERN},
        ),
    ] = None
    seed: Annotated[
        int,
        Field(
            ge=-1,
            description="-1 draws a random seed. Any larger integer is accepted and reduced modulo 2**53 "
            "(used as sent below that); the result's `seed` is the one used.",
        ),
    ] = -1
    output_format: Literal["jpeg", "png", "webp"] = "jpeg"
    enable_base64_output: StrictBool = False
    enable_sync_mode: StrictBool = False
    loras: Annotated[list[LoraSpec] | None, Field(max_length=3, description="-lora endpoints: up to 3.")] = None
    # Not exposed by the hosted API: server defaults apply unless the operator allows overrides.
    negative_prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)] = None
    num_inference_steps: Annotated[int | None, Field(ge=1, le=200)] = None
    true_cfg_scale: Annotated[float | None, Field(ge=1.0, le=20.0)] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return _unicode(value, "prompt")

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt(cls, value: str | None) -> str | None:
        return None if value is None else _unicode(value, "negative_prompt")

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value


def _unicode(value: str, name: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``) that no tokenizer can encode, and NUL characters
    that mean nothing in a prompt and that PostgreSQL cannot store in text: refuse both here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
    if "\x00" in value:
        raise ValueError(f"{name} holds a NUL character (\\u0000)")
    return value


class Timings(BaseModel):
    inference: int = 0


class Urls(BaseModel):
    get: str


class Progress(BaseModel):
    step: int
    total: int


class Prediction(BaseModel):
    id: str
    model: str
    outputs: list[str]
    urls: Urls
    has_nsfw_contents: list[bool]
    status: Literal["created", "processing", "completed", "failed"]
    created_at: str
    error: str
    timings: Timings
    code: int | None = Field(None, description="Task error code when failed (1400..5004).")
    progress: Progress | None = Field(None, description="Denoising steps done (an extension).")
    seed: int | None = Field(None, description="The seed the edit ran with (an extension): same seed, same pixels.")


class PredictionEnvelope(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [PREDICTION_CREATED, PREDICTION_RUNNING, PREDICTION_COMPLETED]}
    )
    code: int = 200
    message: str = "success"
    data: Prediction


class ErrorData(BaseModel):
    error: str


class ErrorEnvelope(BaseModel):
    """Every HTTP-level error (API.md): the status again in ``code``, the text three times over."""

    code: int
    message: str
    data: ErrorData
    error: str


def error_responses(errors: dict[int, tuple[str, str]]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with its description, the error envelope's schema
    and an example."""
    return {
        status: {
            "model": ErrorEnvelope,
            "description": description,
            "content": {"application/json": {"example": error_example(status, message)}},
        }
        for status, (description, message) in errors.items()
    }


class UploadRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"filename": "photo.jpg", "size": 123456, "content_type": "image/jpeg"}]},
    )
    filename: Annotated[str, Field(min_length=1, max_length=255)]
    size: Annotated[
        int, Field(ge=1, le=MAX_UPLOAD_BYTES, description="Bytes (QWEN_EDIT_MAX_IMAGE_BYTES may lower the cap).")
    ]
    content_type: str | None = None


class UploadInstruction(BaseModel):
    method: Literal["PUT"] = "PUT"
    url: str
    headers: dict[str, str]


class UploadData(BaseModel):
    type: str
    download_url: str
    filename: str
    size: int
    upload: UploadInstruction | None = None


class UploadEnvelope(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [UPLOAD_TICKET]})
    code: int = 200
    message: str = "success"
    data: UploadData


class SecretData(BaseModel):
    secret: str


class SecretEnvelope(BaseModel):
    code: int = 200
    message: str = "success"
    data: SecretData


def envelope(data: Any) -> dict[str, Any]:
    return {"code": 200, "message": "success", "data": data}


def iso_ms(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"
