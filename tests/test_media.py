"""/files/ serves only stored files (no traversal: raw paths, through the real server) and signed
upload URLs are checked and expire (in process)."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import sqlite3
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support import KEY1, ServerProc, png_bytes

TRAVERSALS = [
    "/files/../jobs.db",
    "/files/../../etc/passwd",
    "/files/outputs/../../jobs.db",
    "/files/outputs/..%2f..%2fjobs.db",
    "/files/uploads/%2e%2e/%2e%2e/jobs.db",
    "/files/%2e%2e/jobs.db",
    "/files//etc/passwd",
    "/files/outputs//etc/passwd",
    "/files/outputs/%2fetc%2fpasswd",
    "/files/inputs/..%5c..%5cjobs.db",
    "/files/outputs/%00",
    "/files/jobs.db",
    "/files/api_key",
]


def raw_get(srv: ServerProc, path: str) -> tuple[int, bytes]:
    """Send the path exactly as written (httpx would normalise the dot segments away)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.e2e
@pytest.mark.parametrize("path", TRAVERSALS)
def test_files_cannot_escape_their_folders(server: ServerProc, path: str) -> None:
    status, body = raw_get(server, path)
    assert status in (400, 404), (path, status, body[:100])
    assert b"SQLite format" not in body and b"root:" not in body and b"test-key" not in body


def _create_upload(client: Any, size: int) -> dict[str, str]:
    r = client.post("/api/v3/media/uploads", json={"filename": "cat.png", "size": size}, headers=KEY1)
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def test_upload_url_tampered_or_expired_is_403(api: Any, app_settings: Any) -> None:
    data = png_bytes()
    ticket = _create_upload(api, len(data))
    put_url = ticket["upload"]["url"]  # type: ignore[index]
    parts = urlsplit(put_url)
    query = dict(p.split("=", 1) for p in parts.query.split("&"))
    key = parts.path.removeprefix("/api/v3/media/uploads/")
    base = parts.path

    def put(q: dict[str, str]) -> Any:
        return api.put(base, params=q, content=data, headers={"Content-Type": "image/png"})

    flipped = ("0" if query["signature"][0] != "0" else "1") + query["signature"][1:]
    assert put({**query, "signature": flipped}).status_code == 403
    assert put({**query, "size": str(len(data) + 1)}).status_code == 403
    assert put({**query, "expires": str(int(query["expires"]) + 3600)}).status_code == 403
    # An expired URL with a *valid* signature (made with the server's own key) is refused too.
    with sqlite3.connect(app_settings.data_dir / "jobs.db") as db:
        signing_key = db.execute("SELECT value FROM meta WHERE key='upload_signing_key'").fetchone()[0]
    expired = int(time.time()) - 5
    mac = hmac.new(bytes.fromhex(signing_key), f"{key}\n{len(data)}\n{expired}".encode(), hashlib.sha256).hexdigest()
    r = put({"size": str(len(data)), "expires": str(expired), "signature": mac})
    assert r.status_code == 403 and "expired" in r.json()["message"]
    assert api.get(ticket["download_url"]).status_code == 404  # nothing stored by the refused PUTs
    # The genuine URL still works.
    assert put(query).status_code == 200
    assert api.get(ticket["download_url"]).content == data


@pytest.mark.parametrize(
    "key",
    [
        "outputs/" + "a" * 5000,
        "uploads/" + "/".join(["d"] * 3000),
        "inputs/" + "b" * 300 + "/x.png",
        "outputs/%00",
        "uploads/\u00e9" * 200,
    ],
)
def test_long_or_odd_file_names_are_404_never_500(api: Any, key: str) -> None:
    for method in ("GET", "HEAD"):
        r = api.request(method, "/files/" + key)
        assert r.status_code == 404, (key[:40], r.status_code)


def test_head_on_a_file(api: Any) -> None:
    raw = png_bytes()
    url = api.post("/api/v3/media/upload/binary", files={"file": ("a.png", raw)}, headers=KEY1).json()["data"][
        "download_url"
    ]
    r = api.head(url)
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(raw) and r.content == b""


def test_a_signed_put_is_good_for_one_upload_of_exactly_its_size(api: Any) -> None:
    data = png_bytes()
    ticket = _create_upload(api, len(data))
    put_url = ticket["upload"]["url"]  # type: ignore[index]
    short = api.put(put_url, content=data[:-5])
    assert short.status_code == 400 and "announced" in short.json()["message"]
    assert api.put(put_url, content=data).status_code == 200  # a refused try does not use it up
    again = api.put(put_url, content=png_bytes(color=(1, 2, 3)))
    assert again.status_code == 403 and "already used" in again.json()["message"]
    assert api.get(ticket["download_url"]).content == data  # the first upload stands


def test_an_own_upload_url_with_a_long_name_is_400_not_500(api: Any) -> None:
    body = {"prompt": "x", "image": "http://testserver/files/uploads/" + "x" * 5000 + ".png"}
    r = api.post("/api/v3/wavespeed-ai/qwen-image/edit", json=body, headers=KEY1)
    assert r.status_code == 400, r.text


def test_outputs_encode_in_their_format_and_png_stays_lossless() -> None:
    """The fast encoder settings (server/media/images.py) still write what was asked: PNG exactly
    the pixels, JPEG and WebP their own format at the output's size."""
    import io

    import numpy as np
    from PIL import Image

    from server.media.images import encode_image

    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for fmt, name in (("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")):
        with Image.open(io.BytesIO(encode_image(image, fmt))) as back:
            assert back.format == name and back.size == (64, 48)
            if fmt == "png":
                assert np.array_equal(np.asarray(back.convert("RGB")), pixels)
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    with Image.open(io.BytesIO(encode_image(rgba, "jpeg"))) as back:
        assert back.mode == "RGB"
