"""Image bytes: what we accept (probe, without decoding pixels), decoding to what the pipeline
takes, and encoding outputs. Pillow sniffs formats from the bytes; a name or header never decides.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import InvalidInput

# Formats a client may send, and the extension we store each under.
ACCEPTED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


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


def decode_image(data: bytes, limits: ImageLimits, *, probed: bool = False) -> Image.Image:
    """Decode to an RGB image the pipeline can take: EXIF orientation applied, alpha on white.

    ``probed``: these bytes passed ``probe_image`` under these limits when they were stored (an
    inline input or an upload, probed at submit): each input is probed once, not again here."""
    if not probed:
        try:  # our caps first: Pillow's own bomb guard only ever sees what passed them
            probe_image(data, limits)
        except ValueError as exc:
            raise InvalidInput(f"the input image is not usable: {exc}") from exc
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


# Output encoders: Pillow's own (libjpeg-turbo, zlib, libwebp), set for speed at the same quality.
# Measured on benchmarks/duty.py's 1 MP photo-like image: PNG with zlib's run-length strategy at
# level 1 takes ~0.55x the time of Pillow's default (level 6) for a file of the same size (after
# PNG's row filters, longer matches buy a photo almost nothing); WebP method 2 ~0.5x the time of
# the default method 4 at the same quality and size. JPEG was fast already.
ENCODER_OPTIONS: dict[str, dict[str, object]] = {
    "jpeg": {"format": "JPEG", "quality": 95},
    "png": {"format": "PNG", "compress_level": 1, "compress_type": 3},  # 3: Z_RLE
    "webp": {"format": "WEBP", "quality": 95, "method": 2},
}


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """An output image as the bytes of ``fmt`` (jpeg, png or webp)."""
    options = ENCODER_OPTIONS.get(fmt, ENCODER_OPTIONS["png"])
    buf = io.BytesIO()
    if options["format"] == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    image.save(buf, **options)  # type: ignore[arg-type]
    return buf.getvalue()
