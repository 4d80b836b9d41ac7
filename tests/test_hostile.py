"""Hostile input, table by table, through the app in process: every URL form that reaches a private
address (as an image, a webhook and a LoRA), every file path that tries to leave /files, encodings,
sizes and formats that are not images. Each is refused at submit with a clear 4xx in the v3
envelope; none is a 5xx, none is accepted and fails later."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from tests.support import KEY1, MODEL_URL, data_uri, png_bytes

LORA_URL = "/api/v3/wavespeed-ai/qwen-image/edit-lora"

# Where a URL can point that the server must not reach, in the forms resolvers read them.
PRIVATE_URLS = [
    "http://127.0.0.1/x.png",
    "http://127.1/x.png",
    "http://0177.0.0.1/x.png",
    "http://0x7f.0.0.1/x.png",
    "http://0x7f000001/x.png",
    "http://2130706433/x.png",
    "http://017700000001/x.png",
    "http://127.000.000.001/x.png",
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/x.png",  # full-width digits
    "http://localhost/x.png",
    "http://app.localhost/x.png",
    "http://[::1]/x.png",
    "http://[0:0:0:0:0:0:0:1]/x.png",
    "http://[::ffff:127.0.0.1]/x.png",
    "http://[::ffff:7f00:1]/x.png",
    "http://[fe80::1]/x.png",
    "http://[fd00::1]/x.png",
    "http://0.0.0.0/x.png",
    "http://0/x.png",
    "http://10.0.0.1/x.png",
    "http://172.16.0.1/x.png",
    "http://192.168.1.1/x.png",
    "http://100.64.0.1/x.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.100.100.200/latest/meta-data/",
    "http://168.63.129.16/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://224.0.0.1/x.png",
    "http://255.255.255.255/x.png",
    "http://192.0.2.1/x.png",
    "http://%31%32%37.0.0.1/x.png",
    "http://127.0.0.1%00.example.com/x.png",
    "http://exa mple.com/x.png",
    "http://example.com:99999/x.png",
    "http://[::1/x.png",
    "file:///etc/passwd",
    "ftp://example.com/x.png",
    "gopher://127.0.0.1:6379/_INFO",
    "dict://127.0.0.1:11211/stat",
    "http://user:pass@127.0.0.1/x.png",
]


@pytest.fixture
def guarded(tmp_path: Any) -> Any:
    """The app with no allow-list: loopback is as forbidden as any private network."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from tests.support import settings_for

    with TestClient(create_app(settings_for(tmp_path / "data", fetch_allow=[]))) as client:
        yield client


def assert_refused(r: Any, status: int = 400) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert body["code"] == status and body["message"] and body["data"]["error"] == body["message"] == body["error"]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_destinations_are_refused_as_image_webhook_and_lora(guarded: Any, url: str) -> None:
    image = data_uri(png_bytes())
    assert_refused(guarded.post(MODEL_URL, json={"prompt": "x", "image": url}, headers=KEY1))
    assert_refused(guarded.post(MODEL_URL, json={"prompt": "x", "image": image}, params={"webhook": url}, headers=KEY1))
    lora = {"prompt": "x", "image": image, "loras": [{"path": url}]}
    assert_refused(guarded.post(LORA_URL, json=lora, headers=KEY1))


PATHS = [
    "/files/../jobs.db",
    "/files/%2e%2e/jobs.db",
    "/files/outputs/%2e%2e/%2e%2e/jobs.db",
    "/files/outputs/..%2f..%2fjobs.db",
    "/files/inputs/..%5c..%5cjobs.db",
    "/files//etc/passwd",
    "/files/outputs/%2fetc%2fpasswd",
    "/files/outputs/%00",
    "/files/api_key",
    "/files/jobs.db",
    "/files/outputs/" + "a" * 5000,
    "/files/uploads/" + "d/" * 2000 + "x.png",
    "/files/outputs/%ff%fe",
    "/files/uploads/\u202ex.png",
]


@pytest.mark.parametrize("path", PATHS)
def test_file_paths_never_leave_the_files(api: Any, path: str) -> None:
    r = api.get(path)
    assert r.status_code in (400, 404), (path[:60], r.status_code)
    assert b"SQLite format" not in r.content and b"root:" not in r.content


def _image(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format=fmt)
    return buf.getvalue()


NOT_IMAGES = {
    "pdf": b"%PDF-1.4\n" + b"0" * 200,
    "html": b"<html><body>hi</body></html>",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "truncated png": png_bytes()[:60],
    "ico": _image("ICO"),
    "empty": b"",
    "zeros": b"\0" * 1024,
}


@pytest.mark.parametrize("name", list(NOT_IMAGES))
def test_formats_that_are_not_accepted_images_are_400(api: Any, name: str) -> None:
    raw = NOT_IMAGES[name]
    for image in (data_uri(raw), base64.b64encode(raw).decode() or "AAAA"):
        assert_refused(api.post(MODEL_URL, json={"prompt": "x", "image": image}, headers=KEY1))
    r = api.post("/api/v3/media/upload/binary", files={"file": ("x.png", raw, "image/png")}, headers=KEY1)
    assert_refused(r)


ENCODINGS = [
    "data:image/png;base64,@@@@",
    "data:image/png,not-base64",
    "data:;base64," + base64.b64encode(b"hello").decode(),
    "data:image/png;base64," + "A" * 15,
    "   ",
    "\x00\x01\x02",
    "not an image, not a url",
]


@pytest.mark.parametrize("image", ENCODINGS)
def test_encodings_that_are_not_images_are_400(api: Any, image: str) -> None:
    assert_refused(api.post(MODEL_URL, json={"prompt": "x", "image": image}, headers=KEY1))


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{\x00}\x00",  # UTF-16
        b'{"prompt": "\xff"}',  # not UTF-8
        b'{"prompt": "x", "image": ' + b"[" * 5000,
        b"1e999",
        b'{"prompt": "x", "image": "a", "prompt": 5}',
    ],
)
def test_bodies_that_are_not_json_objects_are_400(api: Any, raw: bytes) -> None:
    assert_refused(api.post(MODEL_URL, content=raw, headers={**KEY1, "content-type": "application/json"}))


@pytest.mark.parametrize(
    "size,fragment",
    [((1, 5000), "elongated"), ((5000, 1), "elongated"), ((8000, 6000), "pixels")],
)
def test_sizes_the_server_or_the_model_cannot_take_are_400(api: Any, size: tuple[int, int], fragment: str) -> None:
    r = api.post(MODEL_URL, json={"prompt": "x", "image": data_uri(_image("PNG", size))}, headers=KEY1)
    assert_refused(r)
    assert fragment in r.json()["message"]
