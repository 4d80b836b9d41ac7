"""Both upload flows and stored files, in process (raw HTTP through TestClient), and uploads used as
job inputs; the official SDK's upload against the real server is the one end-to-end case here."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest
import wavespeed
from PIL import Image

from server.jobs.store import JobStore
from tests.support import API_KEY, KEY1, MODEL, MODEL_URL, ServerProc, png_bytes, wait_for


def _check_upload_data(data: dict[str, Any], size: int, base: str = "http://testserver") -> None:
    assert data["type"] == "image"
    assert data["size"] == size
    assert data["download_url"].startswith(base + "/files/uploads/")
    assert data["filename"]


def test_binary_upload_v3_and_v2(api: Any) -> None:
    raw = png_bytes()
    for path in ("/api/v3/media/upload/binary", "/api/v2/media/upload/binary"):
        r = api.post(path, files={"file": ("cat.png", raw, "image/png")}, headers=KEY1)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["code"] == 200 and body["message"] == "success"
        _check_upload_data(body["data"], len(raw))
        assert api.get(body["data"]["download_url"]).content == raw


def test_binary_upload_refuses_non_images_and_needs_a_key(api: Any) -> None:
    r = api.post("/api/v3/media/upload/binary", files={"file": ("a.png", b"hello", "image/png")}, headers=KEY1)
    assert r.status_code == 400 and r.json()["code"] == 400
    r = api.post("/api/v3/media/upload/binary", files={"file": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 401


def test_ticket_upload_flow(api: Any) -> None:
    raw = png_bytes((64, 64))
    r = api.post(
        "/api/v3/media/uploads",
        json={"filename": "dog.png", "size": len(raw), "content_type": "image/png"},
        headers=KEY1,
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    _check_upload_data(data, len(raw))
    upload = data["upload"]
    assert upload["method"] == "PUT" and upload["url"].startswith("http://testserver/")
    # A tampered signature or a different object is refused; so are more bytes than announced.
    bad = upload["url"][:-4] + ("0000" if not upload["url"].endswith("0000") else "1111")
    assert api.put(bad, content=raw).status_code == 403
    assert api.put(upload["url"].replace("dog.png", "cat.png"), content=raw).status_code == 403
    assert api.put(upload["url"], content=raw + b"x" * 10).status_code == 413
    # The PUT carries no Authorization: the URL's own signature authorises it.
    put = api.put(upload["url"], content=raw, headers=upload["headers"])
    assert put.status_code == 200, put.text
    assert api.get(data["download_url"]).content == raw


def test_own_upload_is_read_from_storage_not_over_http(stack: Any, app_settings: Any) -> None:
    raw = png_bytes()
    url = stack.post("/api/v3/media/upload/binary", files={"file": ("x.png", raw)}, headers=KEY1).json()["data"][
        "download_url"
    ]
    pid = stack.post(MODEL_URL, json={"prompt": "x", "image": url, "size": "256*256"}, headers=KEY1).json()["data"][
        "id"
    ]
    # The job references the stored key, so it works even if the server cannot reach its own URL.
    store = JobStore.open(app_settings)
    try:
        job = store.get(pid)
        assert job is not None and [ref.to_json() for ref in job.params.images] == [{"key": url.split("/files/", 1)[1]}]
    finally:
        store.close()

    def status() -> Any:
        data = stack.get(f"/api/v3/predictions/{pid}/result", headers=KEY1).json()["data"]
        return data["status"] in ("completed", "failed") and data["status"]

    assert wait_for(status) == "completed"


def test_unknown_own_upload_is_400(api: Any) -> None:
    r = api.post(
        MODEL_URL, json={"prompt": "x", "image": "http://testserver/files/uploads/nope/missing.png"}, headers=KEY1
    )
    assert r.status_code == 400 and "does not exist on this server" in r.json()["message"]


@pytest.mark.e2e
def test_sdk_upload_then_edit(server: ServerProc, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes((96, 64)))
    client = wavespeed.Client(api_key=API_KEY, base_url=server.url)
    url = client.upload(str(path))
    assert url.startswith(server.url + "/files/uploads/")
    out = client.run(MODEL, {"prompt": "x", "image": url, "size": "256*256"}, poll_interval=0.2)
    img = Image.open(io.BytesIO(httpx.get(out["outputs"][0]).content))
    assert img.size == (256, 256)


def test_a_file_removed_after_its_route_opened_it_is_still_sent_whole(tmp_path: Path) -> None:
    """Retention may remove a file between the route's open and the body's send: the response
    reads from the open descriptor (a path opened after the headers went out failed mid-response,
    the CI failure of test_retention_deletes_old_jobs_and_files_only). A range is served too."""
    import asyncio

    from server.api.routes.media import OpenedFileResponse

    path = tmp_path / "a.png"
    data = png_bytes() * 20
    path.write_bytes(data)

    def served(headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        response = OpenedFileResponse(open(path, "rb"), path, media_type="image/png")  # noqa: SIM115 - it closes it
        path.unlink()  # removed after the route opened it
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client never leaves
            return {}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "headers": headers, "extensions": {"http.response.pathsend": {}}}
        asyncio.run(response(scope, receive, send))
        path.write_bytes(data)  # back, for the next request
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    assert served([]) == (200, data)
    assert served([(b"range", b"bytes=10-19")]) == (206, data[10:20])
