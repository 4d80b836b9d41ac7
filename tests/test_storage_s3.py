"""S3 storage against a real S3-compatible server (moto's server mode on a loopback port), both
directly and end to end through the real server and worker."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import httpx
import pytest
from PIL import Image

from server.settings import Settings
from server.storage.base import StorageError
from server.storage.factory import build_storage, file_url
from server.storage.s3 import S3Storage, parse_s3_url
from tests.support import ServerProc, data_uri, free_port, png_bytes

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"qe-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://b") == ("b", "")
    assert parse_s3_url("s3://b/some/prefix/") == ("b", "some/prefix/")
    with pytest.raises(ValueError):
        parse_s3_url("http://b/x")


def test_put_get_exists_delete(s3_endpoint: str, bucket: str) -> None:
    storage = S3Storage(f"s3://{bucket}/pre", endpoint_url=s3_endpoint)
    key = "outputs/job1/0-abc.png"
    data = png_bytes()
    assert not storage.exists(key)
    storage.put(key, data)
    assert storage.exists(key) and storage.get(key) == data
    assert storage.local_path(key) is None
    # Under the prefix, with the content type guessed from the key.
    raw = boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket=bucket, Key=f"pre/{key}")
    assert raw["ContentType"] == "image/png"
    storage.delete(key)
    assert not storage.exists(key)
    with pytest.raises(FileNotFoundError):
        storage.get(key)
    with pytest.raises(FileNotFoundError):
        storage.get("../escape")


def test_presigned_url_is_fetchable(s3_endpoint: str, bucket: str) -> None:
    settings = Settings(storage_url=f"s3://{bucket}", s3_endpoint_url=s3_endpoint, storage_presign=True)
    storage = build_storage(settings)
    assert isinstance(storage, S3Storage)
    storage.put("outputs/j/0.png", b"\x89PNG-bytes")
    url = file_url(storage, settings, "http://api.example", "outputs/j/0.png")
    assert url.startswith(s3_endpoint) and "Signature" in url
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.content == b"\x89PNG-bytes"
    plain = Settings(storage_url=f"s3://{bucket}", s3_endpoint_url=s3_endpoint)
    assert (
        file_url(storage, plain, "http://api.example", "outputs/j/0.png") == "http://api.example/files/outputs/j/0.png"
    )


def test_missing_bucket_is_a_storage_error(s3_endpoint: str) -> None:
    storage = S3Storage("s3://no-such-bucket-here", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError):
        storage.put("outputs/x.png", b"x")


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError):
        build_storage(Settings(storage_url="gs://bucket"))


def _s3_env(endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    return {**CREDS, "QWEN_EDIT_STORAGE_URL": f"s3://{bucket}/qe", "QWEN_EDIT_S3_ENDPOINT_URL": endpoint, **extra}


def _edit(srv: ServerProc, fmt: str = "png") -> dict[str, Any]:
    r = srv.submit({"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256", "output_format": fmt})
    assert r.status_code == 200, r.text
    return srv.wait(r.json()["data"]["id"])


@pytest.mark.e2e
def test_server_end_to_end_on_s3(make_server: Callable[..., ServerProc], s3_endpoint: str, bucket: str) -> None:
    srv = make_server(**_s3_env(s3_endpoint, bucket))
    # Uploads go to the bucket too, and a job can use one.
    up = httpx.post(
        f"{srv.url}/api/v3/media/upload/binary",
        files={"file": ("in.png", png_bytes(), "image/png")},
        headers=srv.headers,
        timeout=30,
    )
    assert up.status_code == 200, up.text
    download = up.json()["data"]["download_url"]
    r = srv.submit({"prompt": "x", "image": download, "size": "256*256", "output_format": "png"})
    done = srv.wait(r.json()["data"]["id"])
    assert done["status"] == "completed", done
    out = done["outputs"][0]
    assert out.startswith(f"{srv.url}/files/outputs/")
    img = httpx.get(out, timeout=10)
    assert img.status_code == 200 and Image.open(io.BytesIO(img.content)).size == (256, 256)
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]}
    assert "qe/" + out.split("/files/", 1)[1] in keys
    assert any(k.startswith("qe/uploads/") for k in keys)
    assert not (srv.data_dir / "files" / "outputs").exists()  # nothing written to the local disk


@pytest.mark.e2e
def test_server_presigned_outputs(make_server: Callable[..., ServerProc], s3_endpoint: str, bucket: str) -> None:
    srv = make_server(**_s3_env(s3_endpoint, bucket, QWEN_EDIT_STORAGE_PRESIGN="true"))
    done = _edit(srv, "jpeg")
    assert done["status"] == "completed", done
    out = done["outputs"][0]
    assert out.startswith(f"{s3_endpoint}/{bucket}/qe/outputs/") and "Signature" in out
    img = httpx.get(out, timeout=10)
    assert img.status_code == 200 and Image.open(io.BytesIO(img.content)).format == "JPEG"


def test_chained_edits_on_presigned_s3_outputs(s3_endpoint: str, bucket: str, tmp_path: Any) -> None:
    """A presigned object URL handed out as an output is ours: handed back, it is read from the
    bucket by key (its signature is not needed), in process with a worker loop."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from tests.support import KEY1, MODEL_URL, FakeRunner, ThreadWorker, settings_for, wait_for

    settings = settings_for(
        tmp_path / "data", storage_url=f"s3://{bucket}/qe", s3_endpoint_url=s3_endpoint, storage_presign=True
    )

    def finished(client: Any, pid: str) -> dict[str, Any]:
        def done() -> Any:
            data = client.get(f"/api/v3/predictions/{pid}/result", headers=KEY1).json()["data"]
            return data if data["status"] in ("completed", "failed") else None

        return wait_for(done, 30, pid)  # type: ignore[no-any-return]

    with TestClient(create_app(settings)) as client:
        worker = ThreadWorker(settings, FakeRunner()).start()
        try:
            image = data_uri(png_bytes())
            for _ in range(3):
                r = client.post(MODEL_URL, json={"prompt": "x", "image": image, "size": "256*256"}, headers=KEY1)
                assert r.status_code == 200, r.text
                done = finished(client, r.json()["data"]["id"])
                assert done["status"] == "completed", done
                image = done["outputs"][0]
                assert image.startswith(f"{s3_endpoint}/{bucket}/qe/outputs/") and "Signature" in image
            stale = image.split("?", 1)[0]  # no signature at all: still ours, still read by key
            r = client.post(MODEL_URL, json={"prompt": "x", "image": stale}, headers=KEY1)
            assert r.status_code == 200, r.text
            missing = f"{s3_endpoint}/{bucket}/qe/outputs/{'0' * 32}/0-x.png"
            r = client.post(MODEL_URL, json={"prompt": "x", "image": missing}, headers=KEY1)
            assert r.status_code == 400 and "does not exist on this server" in r.json()["message"]
        finally:
            worker.stop()


@pytest.mark.e2e
def test_three_chained_edits_with_both_sdks_on_s3(
    make_server: Callable[..., ServerProc], s3_endpoint: str, bucket: str, tmp_path: Any
) -> None:
    """The official Python and JS SDKs chain three edits, sync and async, on a server whose files
    are in S3 and whose output links are presigned object URLs (links through the API to S3-held
    files are handed back in test_server_end_to_end_on_s3)."""
    from tests.support import API_KEY, python_sdk_chain, require_js, run_js

    require_js()
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes((96, 64)))
    srv = make_server(**_s3_env(s3_endpoint, bucket, QWEN_EDIT_STORAGE_PRESIGN="true"))
    for sync in (False, True):
        python_steps = python_sdk_chain(srv.url, photo, sync=sync)
        js_steps = run_js("chain.js", srv.url, API_KEY, str(photo), "sync" if sync else "async")["steps"]
        for steps in (python_steps, js_steps):
            assert len(steps) == 4 and all(s.startswith(f"{s3_endpoint}/{bucket}/qe/outputs/") for s in steps[1:])
            assert httpx.get(steps[-1], timeout=10).status_code == 200
