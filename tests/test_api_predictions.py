"""Submit and result, end to end through the real server and the tiny diffusers pipeline,
driven by the official wavespeed SDK and by raw HTTP as API.md describes.
"""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import pytest
import wavespeed
from PIL import Image

from tests.conftest import API_KEY, ServerProc, data_uri, png_bytes

MODEL = "wavespeed-ai/qwen-image/edit"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def fetch_image(url: str) -> Image.Image:
    r = httpx.get(url, timeout=10)  # output links need no API key, like the hosted CDN's
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


def test_sdk_run_async(server: ServerProc) -> None:
    client = wavespeed.Client(api_key=API_KEY, base_url=server.url)
    out = client.run(
        MODEL, {"prompt": "make it blue", "image": data_uri(png_bytes()), "size": "256*256"}, poll_interval=0.2
    )
    assert len(out["outputs"]) == 1
    img = fetch_image(out["outputs"][0])
    assert img.format == "JPEG" and img.size == (256, 256)


def test_sdk_run_sync_mode(server: ServerProc) -> None:
    client = wavespeed.Client(api_key=API_KEY, base_url=server.url)
    out = client.run(
        MODEL,
        {"prompt": "make it blue", "image": data_uri(png_bytes()), "size": "320*256", "output_format": "png"},
        enable_sync_mode=True,
    )
    img = fetch_image(out["outputs"][0])
    assert img.format == "PNG" and img.size == (320, 256)


def test_submit_envelope_is_exact(server: ServerProc) -> None:
    r = server.submit({"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256", "seed": 5})
    assert r.status_code == 200  # exactly 200: several SDKs treat 201/202 as failure
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    data = body["data"]
    assert set(data) >= {
        "id",
        "model",
        "outputs",
        "urls",
        "has_nsfw_contents",
        "status",
        "created_at",
        "error",
        "timings",
    }
    assert data["model"] == MODEL
    assert data["status"] == "created" and data["outputs"] == [] and data["error"] == ""
    assert ISO_MS.match(data["created_at"]), data["created_at"]
    assert data["timings"] == {"inference": 0}
    assert data["urls"]["get"] == f"{server.url}/api/v3/predictions/{data['id']}/result"

    # urls.get itself serves the result (huggingface_hub polls that URL's path).
    done = server.wait(data["id"])
    assert done["status"] == "completed"
    assert isinstance(done["timings"]["inference"], int) and done["timings"]["inference"] > 0
    assert done["has_nsfw_contents"] == [False]
    polled = httpx.get(data["urls"]["get"], headers=server.headers).json()
    assert polled["code"] == 200 and polled["data"]["outputs"] == done["outputs"]
    # The other result paths answer the same.
    for path in (f"/api/v3/predictions/{data['id']}", f"/api/v2/predictions/{data['id']}/result"):
        other = httpx.get(server.url + path, headers=server.headers).json()
        assert other["data"]["status"] == "completed" and other["data"]["outputs"] == done["outputs"]


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_output_formats(server: ServerProc, fmt: str, pil: str) -> None:
    r = server.submit({"prompt": "x", "image": data_uri(png_bytes()), "size": "256*288", "output_format": fmt})
    data = server.wait(r.json()["data"]["id"])
    assert data["status"] == "completed", data
    assert data["outputs"][0].endswith("." + fmt)
    img = fetch_image(data["outputs"][0])
    assert img.format == pil and img.size == (256, 288)


def test_base64_output(server: ServerProc) -> None:
    r = server.submit(
        {
            "prompt": "x",
            "image": data_uri(png_bytes()),
            "size": "256*256",
            "output_format": "png",
            "enable_base64_output": True,
            "enable_sync_mode": True,
        }
    )
    data = r.json()["data"]
    assert data["status"] == "completed"
    raw = data["outputs"][0]
    assert not raw.startswith("data:")  # bare base64
    img = Image.open(io.BytesIO(base64.b64decode(raw)))
    assert img.format == "PNG" and img.size == (256, 256)
    assert server.result(data["id"])["outputs"] == [raw]


def test_input_forms(server: ServerProc, image_host: tuple[str, dict]) -> None:
    host, routes = image_host
    routes["/cat.png"] = (200, png_bytes((96, 64)), {"Content-Type": "image/png"})
    jpeg = png_bytes((64, 96), fmt="JPEG")
    forms = {
        "url": f"{host}/cat.png",
        "data_uri": data_uri(jpeg, "image/jpeg"),
        "bare_base64": base64.b64encode(png_bytes()).decode(),
    }
    ids = {
        name: server.submit({"prompt": "x", "image": v, "size": "256*256"}).json()["data"]["id"]
        for name, v in forms.items()
    }
    for name, pid in ids.items():
        data = server.wait(pid)
        assert data["status"] == "completed", (name, data)


def test_size_follows_input_when_absent(server: ServerProc) -> None:
    data = server.submit({"prompt": "x", "image": data_uri(png_bytes((128, 64))), "enable_sync_mode": True}).json()[
        "data"
    ]
    img = fetch_image(data["outputs"][0])
    # ~1 MP at the input's 2:1 aspect, sides multiples of 16, like the pipeline's own default.
    w, h = img.size
    assert abs(w / h - 2.0) < 0.1 and 0.8e6 < w * h < 1.2e6


def test_unreachable_url_fails_with_media_code(server: ServerProc, image_host: tuple[str, dict]) -> None:
    host, _ = image_host
    data = server.wait(
        server.submit({"prompt": "x", "image": f"{host}/missing.png", "size": "256*256"}).json()["data"]["id"]
    )
    assert data["status"] == "failed" and data["code"] == 1402
    assert "404" in data["error"] and data["outputs"] == []


def test_url_that_is_not_an_image_fails_clearly(server: ServerProc, image_host: tuple[str, dict]) -> None:
    host, routes = image_host
    routes["/page.html"] = (200, b"<html>hello</html>", {"Content-Type": "text/html"})
    data = server.wait(server.submit({"prompt": "x", "image": f"{host}/page.html"}).json()["data"]["id"])
    assert data["status"] == "failed" and data["code"] == 1401 and "image" in data["error"]


def test_seed_is_recorded_and_reproducible(server: ServerProc) -> None:
    body = {
        "prompt": "same",
        "image": data_uri(png_bytes()),
        "size": "256*256",
        "seed": 1234,
        "output_format": "png",
        "enable_sync_mode": True,
    }
    a = server.submit(body).json()["data"]
    b = server.submit(body).json()["data"]
    c = server.submit({**body, "seed": 4321}).json()["data"]
    pa, pb, pc = (httpx.get(d["outputs"][0]).content for d in (a, b, c))
    assert pa == pb  # same input, prompt and seed: same bytes
    assert pa != pc


def test_random_seed_is_drawn_and_recorded(server: ServerProc) -> None:
    # seed -1 draws a seed; the job records the one it used (see the job row through the store).
    from server.jobs.store import JobStore

    pid = server.submit({"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256", "seed": -1}).json()["data"][
        "id"
    ]
    server.wait(pid)
    store = JobStore(f"sqlite:///{server.data_dir / 'jobs.db'}")
    job = store.get(pid)
    assert job is not None and 0 <= job.seed <= 2147483647 and job.params["seed"] == job.seed
    store.close()


def test_unknown_fields_and_client_headers_are_ignored(server: ServerProc) -> None:
    r = httpx.post(
        f"{server.url}/api/v3/{MODEL}",
        json={
            "prompt": "x",
            "image": data_uri(png_bytes()),
            "size": "256*256",
            "images": ["ignored"],
            "guidance_scale": 3,
            "whatever": {"a": 1},
        },
        headers={
            **server.headers,
            "X-Client-Name": "wavespeed-js",
            "X-Client-Version": "0.3.2",
            "X-Client-OS": "linux",
        },
    )
    assert r.status_code == 200, r.text


def test_json_without_content_type(server: ServerProc) -> None:
    body = json.dumps({"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256"})
    r = httpx.post(
        f"{server.url}/api/v3/{MODEL}", content=body, headers={**server.headers, "content-type": "text/plain"}
    )
    assert r.status_code == 200, r.text


def _assert_error(r: httpx.Response, status: int, fragment: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == status and isinstance(body["message"], str) and body["message"]
    assert body["data"]["error"] == body["message"] == body["error"]
    assert fragment.lower() in body["message"].lower(), body["message"]


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"image": "x"}, "prompt"),
        ({"prompt": "", "image": data_uri(png_bytes())}, "prompt"),
        ({"prompt": "x"}, "image is required"),
        ({"prompt": "x", "image": "not an image at all!"}, "image"),
        ({"prompt": "x", "image": "data:image/png;base64,AAAAAAAAAAAAAAAAAAAAAAAA"}, "image"),
        ({"prompt": "x", "image": "ftp://example.com/a.png"}, "image"),
        ({"prompt": "x", "image": data_uri(png_bytes()), "size": "100*100"}, "size"),
        ({"prompt": "x", "image": data_uri(png_bytes()), "size": "big"}, "size"),
        ({"prompt": "x", "image": data_uri(png_bytes()), "seed": -2}, "seed"),
        ({"prompt": "x", "image": data_uri(png_bytes()), "seed": 2**31}, "seed"),
        ({"prompt": "x", "image": data_uri(png_bytes()), "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "image": data_uri(png_bytes()), "enable_sync_mode": "yes"}, "enable_sync_mode"),
        ({"prompt": 5, "image": data_uri(png_bytes())}, "prompt"),
    ],
)
def test_bad_bodies_are_400_in_the_envelope(server: ServerProc, body: dict, fragment: str) -> None:
    _assert_error(server.submit(body), 400, fragment)


def test_malformed_json_is_400(server: ServerProc) -> None:
    r = httpx.post(
        f"{server.url}/api/v3/{MODEL}",
        content=b"{not json",
        headers={**server.headers, "content-type": "application/json"},
    )
    _assert_error(r, 400, "json")
    r = httpx.post(f"{server.url}/api/v3/{MODEL}", content=b"[1, 2]", headers=server.headers)
    _assert_error(r, 400)


def test_base64_output_with_webhook_is_rejected(server: ServerProc) -> None:
    r = server.submit(
        {"prompt": "x", "image": data_uri(png_bytes()), "enable_base64_output": True},
        params={"webhook": "http://127.0.0.1:9/hook"},
    )
    _assert_error(r, 400, "webhook")


def test_auth(server: ServerProc) -> None:
    url = f"{server.url}/api/v3/{MODEL}"
    body = {"prompt": "x", "image": data_uri(png_bytes())}
    _assert_error(httpx.post(url, json=body), 401)
    _assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}), 401)
    _assert_error(httpx.post(url, json=body, headers={"Authorization": "Basic dGVzdA=="}), 401)
    _assert_error(httpx.get(f"{server.url}/api/v3/predictions/abc/result"), 401)
    # The second configured key works too.
    r = httpx.post(url, json={**body, "size": "256*256"}, headers={"Authorization": "Bearer test-key-2"})
    assert r.status_code == 200


def test_unknown_prediction_and_model_are_404(server: ServerProc) -> None:
    _assert_error(httpx.get(f"{server.url}/api/v3/predictions/doesnotexist/result", headers=server.headers), 404)
    _assert_error(httpx.get(f"{server.url}/api/v2/predictions/doesnotexist/result", headers=server.headers), 404)
    _assert_error(server.submit({"prompt": "x"}, model="wavespeed-ai/flux-dev"), 404, "not served")
    _assert_error(
        server.submit({"prompt": "x", "images": []}, model="wavespeed-ai/qwen-image/edit-plus"), 404, "not enabled"
    )


def test_sdk_reports_failed_prediction(server: ServerProc, image_host: tuple[str, dict]) -> None:
    host, _ = image_host
    client = wavespeed.Client(api_key=API_KEY, base_url=server.url)
    with pytest.raises(RuntimeError, match="failed"):
        client.run(MODEL, {"prompt": "x", "image": f"{host}/nothing-here.png"}, poll_interval=0.2)
