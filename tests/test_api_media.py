"""Both upload flows, with raw HTTP and the official SDK, and uploads used as job inputs."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import wavespeed
from PIL import Image

from tests.conftest import API_KEY, ServerProc, png_bytes

MODEL = "wavespeed-ai/qwen-image/edit"


def _check_upload_data(data: dict, server: ServerProc, size: int) -> None:
    assert data["type"] == "image"
    assert data["size"] == size
    assert data["download_url"].startswith(server.url + "/files/uploads/")
    assert data["filename"]


def test_binary_upload_v3_and_v2(server: ServerProc) -> None:
    raw = png_bytes()
    for path in ("/api/v3/media/upload/binary", "/api/v2/media/upload/binary"):
        r = httpx.post(server.url + path, files={"file": ("cat.png", raw, "image/png")}, headers=server.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["code"] == 200 and body["message"] == "success"
        _check_upload_data(body["data"], server, len(raw))
        assert httpx.get(body["data"]["download_url"]).content == raw


def test_binary_upload_refuses_non_images_and_needs_a_key(server: ServerProc) -> None:
    r = httpx.post(
        server.url + "/api/v3/media/upload/binary",
        files={"file": ("a.png", b"hello", "image/png")},
        headers=server.headers,
    )
    assert r.status_code == 400 and r.json()["code"] == 400
    r = httpx.post(server.url + "/api/v3/media/upload/binary", files={"file": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 401


def test_ticket_upload_flow(server: ServerProc) -> None:
    raw = png_bytes((64, 64))
    r = httpx.post(
        server.url + "/api/v3/media/uploads",
        json={"filename": "dog.png", "size": len(raw), "content_type": "image/png"},
        headers=server.headers,
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    _check_upload_data(data, server, len(raw))
    upload = data["upload"]
    assert upload["method"] == "PUT" and upload["url"].startswith(server.url)
    # The PUT carries no Authorization: the URL's own signature authorises it.
    put = httpx.put(upload["url"], content=raw, headers=upload["headers"])
    assert put.status_code == 200, put.text
    assert httpx.get(data["download_url"]).content == raw
    # A tampered signature or a different object is refused.
    bad = upload["url"][:-4] + ("0000" if not upload["url"].endswith("0000") else "1111")
    assert httpx.put(bad, content=raw).status_code == 403
    other = upload["url"].replace("dog.png", "cat.png")
    assert httpx.put(other, content=raw).status_code == 403
    # More bytes than announced: refused.
    assert httpx.put(upload["url"], content=raw + b"x" * 10).status_code == 413


def test_sdk_upload_then_edit(server: ServerProc, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes((96, 64)))
    client = wavespeed.Client(api_key=API_KEY, base_url=server.url)
    url = client.upload(str(path))
    assert url.startswith(server.url + "/files/uploads/")
    out = client.run(MODEL, {"prompt": "x", "image": url, "size": "256*256"}, poll_interval=0.2)
    img = Image.open(io.BytesIO(httpx.get(out["outputs"][0]).content))
    assert img.size == (256, 256)


def test_own_upload_is_read_locally_not_over_http(server: ServerProc) -> None:
    raw = png_bytes()
    r = httpx.post(server.url + "/api/v3/media/upload/binary", files={"file": ("x.png", raw)}, headers=server.headers)
    url = r.json()["data"]["download_url"]
    data = server.submit({"prompt": "x", "image": url, "size": "256*256"}).json()["data"]
    # The job references the stored key, so it works even if the server cannot reach its own URL.
    from server.jobs.store import JobStore

    store = JobStore(f"sqlite:///{server.data_dir / 'jobs.db'}")
    job = store.get(data["id"])
    store.close()
    assert job is not None and job.params["images"] == [{"key": url.split("/files/", 1)[1]}]
    assert server.wait(data["id"])["status"] == "completed"


def test_unknown_own_upload_is_400(server: ServerProc) -> None:
    r = server.submit({"prompt": "x", "image": f"{server.url}/files/uploads/nope/missing.png"})
    assert r.status_code == 400 and "upload" in r.json()["message"]


def test_files_cannot_escape_their_folder(server: ServerProc) -> None:
    for path in ("/files/../jobs.db", "/files/outputs/../../jobs.db", "/files/%2e%2e/jobs.db", "/files/jobs.db"):
        r = httpx.get(server.url + path)
        assert r.status_code == 404, path
