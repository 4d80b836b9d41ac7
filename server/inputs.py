"""Turning the ``image`` strings of a request into images.

At submit time (API process) each string becomes a *reference* stored on the job:
``{"key": ...}`` for bytes we hold (an inline data URI or base64, decoded and checked now, or one of
our own uploads) and ``{"url": ...}`` for a remote image, fetched by the worker. At run time
(worker process) a reference becomes an RGB PIL image.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import BadRequest, InvalidInput, MediaError
from server.netguard import BlockedDestination, NetGuard, guarded_client
from server.storage import Storage

# Formats a client may send. Pillow sniffs them from the bytes; the name or header never decides.
ACCEPTED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_=\s-]+$")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class ProbedImage:
    format: str  # our extension for it: jpeg, png, ...
    width: int
    height: int


def probe_image(data: bytes, limits: ImageLimits) -> ProbedImage:
    """Check that ``data`` is one image we accept, without decoding its pixels. Raises ValueError."""
    if len(data) > limits.max_bytes:
        raise ValueError(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    if not data:
        raise ValueError("image is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = ACCEPTED_FORMATS.get(img.format or "")
            if fmt is None:
                raise ValueError(f"unsupported image format {img.format or 'unknown'}")
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ValueError(f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
            img.verify()
    except Image.DecompressionBombError as exc:  # Pillow's own guard, before ours could look
        raise ValueError(
            f"image has too many pixels (a decompression bomb?); the limit is {limits.max_pixels}"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ValueError("not a readable image (JPEG, PNG, WebP, GIF, BMP or TIFF)") from exc
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"corrupt image: {exc}") from exc
    return ProbedImage(fmt, width, height)


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode to an RGB image the pipeline can take: EXIF orientation applied, alpha on white."""
    probe_image(data, limits)
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.seek(0)  # animated: the first frame
            img: Image.Image = ImageOps.exif_transpose(opened) or opened
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v / 256).convert("L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                return canvas
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"could not decode the image: {exc}") from exc


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


def own_file_key(url: str, own_origins: set[str]) -> str | None:
    """The storage key when ``url`` is a file this server serves (``<origin>/files/<key>``)."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:  # malformed: not ours (refused as a bad URL by the caller)
        return None
    origin = f"{parts.scheme}://{parts.netloc}".lower()
    if origin in own_origins and parts.path.startswith("/files/"):
        return parts.path[len("/files/") :]
    return None


def to_reference(
    value: Any, *, field: str, job_id: str, index: int, storage: Storage, own_origins: set[str], limits: ImageLimits
) -> dict[str, str]:
    """Turn one client image string into a job reference, checking what can be checked now."""
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{field} must be a non-empty string: an http(s) URL, a data URI or base64")
    value = value.strip()
    if value.lower().startswith(("http://", "https://")):
        if len(value) > 4096:
            raise BadRequest(f"{field} URL is longer than 4096 characters")
        key = own_file_key(value, own_origins)
        if key is not None:
            if not key.startswith("uploads/") or not storage.exists(key):
                raise BadRequest(f"{field} refers to an upload that does not exist on this server: {value}")
            return {"key": key}
        return {"url": value}
    data = inline_bytes(value)
    if data is None:
        raise BadRequest(f"{field} must be an http(s) URL, a data:image/...;base64 URI, or base64-encoded image bytes")
    try:
        probed = probe_image(data, limits)
    except ValueError as exc:
        raise BadRequest(f"{field}: {exc}") from exc
    key = f"inputs/{job_id}/{index}.{probed.format}"
    storage.put(key, data)
    return {"key": key}


MAX_REDIRECTS = 5


def fetch_url(
    url: str, *, timeout_s: float, max_bytes: int, guard: NetGuard | None = None, client: httpx.Client | None = None
) -> bytes:
    """GET an image over http(s): SSRF-guarded (see server/netguard.py), redirects followed by hand
    and re-checked at every hop, connect/read timeouts, and a size cap while streaming."""
    guard = guard or NetGuard()
    own = client is None
    client = client or guarded_client(guard)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    current = url
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            guard.check_url(current)
            with client.stream("GET", current, timeout=timeout) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    current = str(resp.url.join(resp.headers["location"]))
                    continue
                return _read_capped(resp, url, max_bytes)
        raise MediaError(f"fetching the image failed: more than {MAX_REDIRECTS} redirects from {url}")
    except BlockedDestination as exc:
        raise MediaError(f"fetching the image was refused: {exc}") from exc
    except ValueError as exc:  # a malformed URL (from a redirect's Location, say)
        raise MediaError(f"fetching the image failed: bad URL: {exc}") from exc
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching the image failed: {type(exc).__name__}: {exc or url}") from exc
    finally:
        if own:
            client.close()


def _read_capped(resp: httpx.Response, url: str, max_bytes: int) -> bytes:
    if resp.status_code != 200:
        raise MediaError(f"fetching the image failed: HTTP {resp.status_code} from {url}")
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"the image at {url} is {declared} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise MediaError(f"the image at {url} is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def load_reference(
    ref: dict[str, str], *, storage: Storage, limits: ImageLimits, fetch_timeout_s: float, guard: NetGuard | None = None
) -> Image.Image:
    """Worker side: a job reference to an RGB image (MediaError / InvalidInput fail the job)."""
    if "key" in ref:
        try:
            data = storage.get(ref["key"])
        except FileNotFoundError as exc:
            raise MediaError(f"the input image {ref['key']} is no longer stored on this server") from exc
    else:
        data = fetch_url(ref["url"], timeout_s=fetch_timeout_s, max_bytes=limits.max_bytes, guard=guard)
    try:
        probe_image(data, limits)
    except ValueError as exc:
        raise InvalidInput(f"the input image is not usable: {exc}") from exc
    return decode_image(data, limits)
