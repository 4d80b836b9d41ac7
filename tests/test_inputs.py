"""Hostile and unusual images: CMYK, 16-bit, animated, alpha, decompression bombs, and odd fields.

Decoding is checked directly (server.media.images), then the same images go through the app in
process (its submit checks, and a worker loop that decodes them for a fake runner).
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from server.errors import InvalidInput
from server.media.images import ImageLimits, decode_image, probe_image
from tests.support import KEY1, MODEL_URL, data_uri, wait_for

LIMITS = ImageLimits(max_bytes=25 * 1024 * 1024, max_pixels=40_000_000)


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")  # red in CMYK


def png16() -> bytes:
    img = Image.new("I;16", (64, 48))
    img.putdata([40000] * (64 * 48))
    return _save(img, "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("P", (64, 48), i) for i in (10, 200, 90)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def rgba_png() -> bytes:
    img = Image.new("RGBA", (64, 48), (0, 0, 255, 0))  # fully transparent blue
    img.paste((255, 0, 0, 255), (0, 0, 32, 48))  # opaque red left half
    return _save(img, "PNG")


def la_png() -> bytes:
    return _save(Image.new("LA", (64, 48), (30, 0)), "PNG")


def palette_transparent_png() -> bytes:
    img = Image.new("P", (64, 48), 1)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    return _save(img, "PNG", transparency=1)


def bomb_png(side: int = 30_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels, a few KB compressed: 900 megapixels decoded."""
    raw = zlib.compress(b"\x00" * ((side + 7) // 8 + 1) * side, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_cmyk_becomes_rgb() -> None:
    img = decode_image(cmyk_jpeg(), LIMITS)
    r, g, b = img.convert("RGB").getpixel((10, 10))  # type: ignore[misc]
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_is_scaled_not_clipped() -> None:
    img = decode_image(png16(), LIMITS)
    value = img.getpixel((5, 5))
    assert img.mode == "RGB" and value == (156, 156, 156)  # 40000 / 256


def test_animated_takes_the_first_frame() -> None:
    probe = probe_image(animated_gif(), LIMITS)
    img = decode_image(animated_gif(), LIMITS)
    assert probe.format == "gif" and img.mode == "RGB" and img.size == (64, 48)


def test_alpha_goes_on_white() -> None:
    img = decode_image(rgba_png(), LIMITS)
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (255, 0, 0)  # opaque part kept
    assert img.getpixel((50, 5)) == (255, 255, 255)  # transparent part on white, not blue or black
    assert decode_image(la_png(), LIMITS).getpixel((1, 1)) == (255, 255, 255)
    assert decode_image(palette_transparent_png(), LIMITS).getpixel((1, 1)) == (255, 255, 255)


def test_decompression_bomb_refused_before_decoding() -> None:
    data = bomb_png()
    assert len(data) < 200_000
    with pytest.raises(ValueError, match="pixels"):
        probe_image(data, LIMITS)
    with pytest.raises((ValueError, InvalidInput)):
        decode_image(data, LIMITS)


def test_truncated_and_garbage_refused() -> None:
    with pytest.raises(ValueError):
        probe_image(rgba_png()[:60], LIMITS)
    with pytest.raises(ValueError, match="readable"):
        probe_image(b"GIF89a" + b"\x00" * 10, LIMITS)
    with pytest.raises(ValueError, match=r"unsupported|readable"):
        probe_image(b"%PDF-1.4\n" + b"0" * 100, LIMITS)


# --- through the app -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,data,mime",
    [
        ("cmyk", cmyk_jpeg(), "image/jpeg"),
        ("16-bit", png16(), "image/png"),
        ("animated", animated_gif(), "image/gif"),
        ("alpha", rgba_png(), "image/png"),
    ],
)
def test_unusual_images_complete(stack: Any, name: str, data: bytes, mime: str) -> None:
    r = submit(stack, {"prompt": f"edit the {name} image", "image": data_uri(data, mime), "size": "256*256"})
    assert r.status_code == 200, r.text
    pid = r.json()["data"]["id"]
    done = wait_for(lambda: (d := result(stack, pid))["status"] in ("completed", "failed") and d, 30, pid)
    assert done["status"] == "completed", done


def test_bomb_is_400_at_submit(api: Any) -> None:
    r = submit(api, {"prompt": "x", "image": data_uri(bomb_png())})
    assert r.status_code == 400, r.text
    assert "pixels" in r.json()["message"]


LONG = "x" * 5000


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "image": 12},
        {"prompt": "x", "image": ["a"]},
        {"prompt": "x", "image": {"url": "http://x"}},
        {"prompt": "x", "image": "   "},
        {"prompt": "x", "image": "not an image, not a url"},
        {"prompt": "x", "image": "data:image/png;base64,@@@@"},
        {"prompt": "x", "image": "data:text/plain,hello"},
        {"prompt": "x", "image": "file:///etc/passwd"},
        {"prompt": "x", "image": "http://169.254.169.254/latest/meta-data/iam"},
        {"prompt": "x", "image": "http://metadata.google.internal/computeMetadata/v1/"},
        {"prompt": "x", "image": "http://[::1/x.png"},
        {"prompt": "x", "image": "http://example.com:99999/x.png"},
        {"prompt": "x", "image": "https://" + "a" * 5000 + ".com/x.png"},
        {"prompt": LONG, "image": "https://example.com/x.png"},
        {"prompt": 5, "image": "https://example.com/x.png"},
        {"prompt": None, "image": "https://example.com/x.png"},
        {"prompt": "x\u0000y", "image": "https://example.com/x.png"},
        {"prompt": "x", "image": "https://example.com/x.png", "negative_prompt": "\u0000"},
        {"prompt": "x", "image": "https://example.com/x.png", "seed": -2},
        {"prompt": "x", "image": "https://example.com/x.png", "seed": 1.5},
        {"prompt": "x", "image": "https://example.com/x.png", "size": "-5*10"},
        {"prompt": "x", "image": "https://example.com/x.png", "size": "99999999999*1"},
        {"prompt": "x", "image": "https://example.com/x.png", "size": 512},
        {"prompt": "x", "image": "https://example.com/x.png", "output_format": "gif"},
        {"prompt": "x", "image": "https://example.com/x.png", "enable_sync_mode": "yes"},
        {"prompt": "x", "image": "https://example.com/x.png", "enable_base64_output": 1},
        {"prompt": "x", "image": "https://example.com/x.png", "num_inference_steps": 0},
        {"prompt": "x", "image": "https://example.com/x.png", "num_inference_steps": 10**9},
        {"prompt": "x", "image": "https://example.com/x.png", "true_cfg_scale": "nan"},
        {"prompt": "x", "image": "https://example.com/x.png", "negative_prompt": LONG},
        {"prompt": "x", "image": "https://example.com/x.png", "loras": [{"path": "a"}] * 4},
        {"prompt": "x", "image": "https://example.com/x.png", "loras": "a"},
    ],
)
def test_hostile_fields_are_400(api: Any, body: dict[str, object]) -> None:
    r = submit(api, body)
    assert r.status_code == 400, (body, r.status_code, r.text[:300])
    envelope = r.json()
    assert envelope["code"] == 400 and envelope["message"] and envelope["data"]["error"] == envelope["message"]


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"null", b"1e999", b'{"prompt": "x", "image": ' + b"[" * 5000])
def test_hostile_bodies_are_400(api: Any, raw: bytes) -> None:
    r = api.post(MODEL_URL, content=raw, headers={**KEY1, "Content-Type": "application/json"})
    assert r.status_code == 400, (raw[:40], r.status_code, r.text[:300])


def test_webhook_to_internal_address_is_400(api: Any) -> None:
    for hook in ("http://169.254.169.254/hook", "http://[fd00::1]/", "ftp://example.com/hook", "http://10.0.0.1/"):
        r = submit(api, {"prompt": "x", "image": "https://example.com/x.png"}, params={"webhook": hook})
        assert r.status_code == 400, (hook, r.text)


def submit(client: Any, body: dict[str, Any], **kw: Any) -> Any:
    return client.post(MODEL_URL, json=body, headers=KEY1, **kw)


def result(client: Any, pid: str) -> dict[str, Any]:
    data: dict[str, Any] = client.get(f"/api/v3/predictions/{pid}/result", headers=KEY1).json()["data"]
    return data
