"""API side: each ``image`` string of a request becomes an ``ImageRef`` on the job.

Bytes we hold get a storage key (an inline data URI or base64, decoded and checked now; a file
this server already stores, named by a URL it handed out: an upload, an earlier output); anything
else is a remote ``url`` the worker fetches through the SSRF guard.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from server.errors import BadRequest
from server.jobs.contract import ImageRef
from server.media.images import ImageLimits, probe_image
from server.media.prepare import PreparedImage
from server.storage.base import Storage, new_input_key, valid_key

MAX_URL_CHARS = 4096
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_=\s-]+$")


def _b64decode(payload: str) -> bytes:
    compact = re.sub(r"\s+", "", payload)
    compact += "=" * (-len(compact) % 4)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("image is not valid base64") from exc


def inline_bytes(value: str) -> bytes | None:
    """The bytes of a data URI or bare base64 string; None when ``value`` is neither."""
    match = _DATA_URI.match(value)
    if match:
        if not match.group("b64"):
            raise BadRequest("image data URIs must be base64-encoded (data:image/png;base64,...)")
        return _b64decode(value[match.end() :])
    if len(value) >= 16 and _B64_CHARS.match(value[:4096]):
        return _b64decode(value)
    return None


def own_file_key(url: str, own_origins: set[str], storage: Storage) -> str | None:
    """The storage key when ``url`` is a file this server handed out: ``<one of our origins>/files/<key>``,
    or an object URL of the bucket behind us (presigned output links)."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:  # malformed: not ours (refused as a bad URL by the caller)
        return None
    origin = f"{parts.scheme}://{parts.netloc}".lower()
    if origin in own_origins and parts.path.startswith("/files/"):
        return unquote(parts.path[len("/files/") :])
    key_of_url = getattr(storage, "key_of_url", None)
    return key_of_url(url) if key_of_url is not None else None


def to_reference(
    value: Any,
    *,
    field: str,
    job_id: str,
    index: int,
    storage: Storage,
    own_origins: set[str],
    limits: ImageLimits,
    may_read: Callable[[str], bool],
    prepared: Mapping[str, PreparedImage] | None = None,
) -> tuple[ImageRef, tuple[int, int] | None]:
    """Turn one client image string into a job reference, checking what can be checked now; with
    the image's (width, height) where its bytes were at hand.

    A file this server handed out (an upload's ``download_url``, an earlier output: the chained
    edit) is read from storage, never fetched back over HTTP; ``may_read(key)`` says whether this
    caller may use it (its own outputs, any upload). Whatever it may not use, or that is not
    there, gets one answer.

    ``prepared``: a big body's inline images, decoded, probed and stored already by a helper
    process (server/media/prepare.py), by the tokens that replaced them in the body."""
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{field} must be a non-empty string: an http(s) URL, a data URI or base64")
    value = value.strip()
    if prepared is not None and value in prepared:
        done = prepared[value]
        if done.key is None:
            raise BadRequest(done.message(field))
        return ImageRef(key=done.key), (done.width, done.height)
    if value.lower().startswith(("http://", "https://")):
        if len(value) > MAX_URL_CHARS:
            raise BadRequest(f"{field} URL is longer than {MAX_URL_CHARS} characters")
        key = own_file_key(value, own_origins, storage)
        if key is not None:
            if not valid_key(key) or not may_read(key) or not storage.exists(key):
                raise BadRequest(f"{field} refers to a file that does not exist on this server: {value}")
            return ImageRef(key=key), None
        return ImageRef(url=value), None
    data = inline_bytes(value)
    if data is None:
        raise BadRequest(f"{field} must be an http(s) URL, a data:image/...;base64 URI, or base64-encoded image bytes")
    try:
        probed = probe_image(data, limits)
    except ValueError as exc:
        raise BadRequest(f"{field}: {exc}") from exc
    key = new_input_key(job_id, index, probed.format)
    storage.put(key, data)
    return ImageRef(key=key), (probed.width, probed.height)
