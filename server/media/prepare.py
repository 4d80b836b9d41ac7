"""Big submit bodies, made small where the event loop cannot feel it.

``json.loads`` and base64 decoding of tens of MB are single C calls that hold the GIL for their
whole run: in a thread they still stall every other request of the API process (measured: a
38 MB submit moved the result polls' p99 by x4.9 from a thread). So a body above
``QWEN_EDIT_BODY_OFFLOAD_BYTES`` goes, raw, to a small pool of helper processes
(server/api/bigbody.py) that run ``prepare_body``: parse it, decode and probe each inline image,
store it under its input key, and hand back the body with each inline image replaced by a token
and what the token stands for. The API process then parses a body of a few hundred bytes.

Everything here also runs in-process (``BODY_PROCESSES=0``); it takes plain values and returns
plain, picklable ones.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from server.errors import BadRequest
from server.media.images import ImageLimits, probe_image
from server.settings import Settings
from server.storage.base import Storage, new_input_key

TOKEN_PREFIX = "qwen-edit-prepared:"  # ':' is neither base64 nor a URL scheme we take: no client value looks like one
IMAGE_FIELDS = ("image", "images")


@dataclass(frozen=True)
class PreparedImage:
    """One inline image, dealt with: stored under ``key`` (with its size), or refused (``error``)."""

    key: str | None = None
    width: int = 0
    height: int = 0
    error: str | None = None
    error_names_field: bool = False  # a probe's error is told as "<field>: <error>", a decoding one as is

    def message(self, field: str) -> str:
        return f"{field}: {self.error}" if self.error_names_field else str(self.error)


@dataclass(frozen=True)
class PreparedBody:
    body: bytes  # the request body with each inline image replaced by its token
    images: dict[str, PreparedImage]  # token -> what it stands for

    @property
    def keys(self) -> set[str]:
        return {image.key for image in self.images.values() if image.key is not None}


_storage: Storage | None = None
_limits: ImageLimits | None = None


def init_helper(settings: Settings) -> None:
    """A helper process's start: its own storage client, as the API process builds it."""
    global _storage, _limits
    from server.storage.factory import build_storage

    _storage = build_storage(settings)
    _limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)


def prepare_in_helper(raw: bytes, job_id: str) -> PreparedBody | None:
    """``prepare_body`` with the helper's own storage (see ``init_helper``)."""
    assert _storage is not None and _limits is not None, "init_helper first"
    return prepare_body(raw, job_id, _storage, _limits)


def prepare_body(raw: bytes, job_id: str, storage: Storage, limits: ImageLimits) -> PreparedBody | None:
    """The body with its inline images stored and replaced by tokens; None when it is not a JSON
    object (the request then goes on as it came, and is refused as it would have been)."""
    from server.media.references import inline_bytes  # here: references imports this module

    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    images: dict[str, PreparedImage] = {}

    def prepare(value: Any, index: int) -> Any:
        if not isinstance(value, str):
            return value
        stripped = value.strip()
        if stripped.lower().startswith(("http://", "https://")):
            return value
        try:
            data = inline_bytes(stripped)
        except BadRequest as exc:
            return _token(images, PreparedImage(error=exc.message))
        if data is None:
            return value  # neither a URL nor inline: refused by the route, as before
        try:
            probed = probe_image(data, limits)
        except ValueError as exc:
            return _token(images, PreparedImage(error=str(exc), error_names_field=True))
        key = new_input_key(job_id, index, probed.format)
        storage.put(key, data)
        return _token(images, PreparedImage(key=key, width=probed.width, height=probed.height))

    if "image" in doc:
        doc["image"] = prepare(doc["image"], 0)
    if isinstance(doc.get("images"), list):
        doc["images"] = [prepare(value, i) for i, value in enumerate(doc["images"])]
    return PreparedBody(json.dumps(doc).encode(), images)


def _token(images: dict[str, PreparedImage], image: PreparedImage) -> str:
    token = TOKEN_PREFIX + secrets.token_urlsafe(18)  # unguessable: a client cannot name another's image
    images[token] = image
    return token
