"""The v3 contract in process: the app through starlette's TestClient (its lifespan runs), a real
worker loop in a thread with the fake runner, a real SQLite file. Envelopes to the field, output
formats, input forms, every refusal as a 4xx in the v3 envelope.
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import pytest
from PIL import Image

from server.jobs.contract import Status
from server.jobs.store import JobStore
from tests.support import KEY1, MODEL, MODEL_URL, data_uri, png_bytes, wait_for

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
IMAGE = data_uri(png_bytes())


def submit(client: Any, body: dict[str, Any], **kw: Any) -> Any:
    return client.post(MODEL_URL, json=body, headers=KEY1, **kw)


def finished(client: Any, pid: str) -> dict[str, Any]:
    def done() -> Any:
        data = client.get(f"/api/v3/predictions/{pid}/result", headers=KEY1).json()["data"]
        return data if data["status"] in ("completed", "failed") else None

    return wait_for(done, 30, pid)  # type: ignore[no-any-return]


def image_at(client: Any, url: str) -> Image.Image:
    r = client.get(url)  # output links need no API key, like the hosted CDN's
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


def assert_error(r: Any, status: int, fragment: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == status and isinstance(body["message"], str) and body["message"]
    assert body["data"]["error"] == body["message"] == body["error"]
    assert fragment.lower() in body["message"].lower(), body["message"]


def test_submit_and_result_envelopes_are_exact(stack: Any) -> None:
    r = submit(stack, {"prompt": "x", "image": IMAGE, "size": "256*256", "seed": 5})
    assert r.status_code == 200  # exactly 200: several SDKs treat 201/202 as failure
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    data = body["data"]
    assert set(data) == {
        "id",
        "model",
        "outputs",
        "urls",
        "has_nsfw_contents",
        "status",
        "created_at",
        "error",
        "timings",
        "seed",  # the seed used (an extension; tests/test_seeds.py)
    }
    assert data["model"] == MODEL and data["status"] == "created" and data["outputs"] == [] and data["error"] == ""
    assert ISO_MS.match(data["created_at"]) and data["timings"] == {"inference": 0}
    assert data["urls"]["get"] == f"http://testserver/api/v3/predictions/{data['id']}/result"

    done = finished(stack, data["id"])
    assert done["status"] == "completed" and done["has_nsfw_contents"] == [False]
    assert isinstance(done["timings"]["inference"], int) and done["timings"]["inference"] > 0
    assert done["progress"] == {"step": 2, "total": 2}
    # urls.get itself serves the result (huggingface_hub polls that URL's path); so do the others.
    for url in (
        data["urls"]["get"],
        f"/api/v3/predictions/{data['id']}",
        f"/api/v2/predictions/{data['id']}/result",
    ):
        other = stack.get(url, headers=KEY1).json()
        assert other["code"] == 200 and other["data"]["outputs"] == done["outputs"]


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_output_formats_and_exact_sizes(stack: Any, fmt: str, pil: str) -> None:
    pid = submit(stack, {"prompt": "x", "image": IMAGE, "size": "256*288", "output_format": fmt}).json()["data"]["id"]
    data = finished(stack, pid)
    assert data["status"] == "completed" and data["outputs"][0].endswith("." + fmt)
    img = image_at(stack, data["outputs"][0])
    assert img.format == pil and img.size == (256, 288)


def test_base64_output_in_sync_mode(stack: Any) -> None:
    body = {"prompt": "x", "image": IMAGE, "size": "256*256", "output_format": "png"}
    r = submit(stack, {**body, "enable_base64_output": True, "enable_sync_mode": True})
    data = r.json()["data"]
    assert data["status"] == "completed"
    raw = data["outputs"][0]
    assert not raw.startswith("data:")  # bare base64
    img = Image.open(io.BytesIO(base64.b64decode(raw)))
    assert img.format == "PNG" and img.size == (256, 256)
    assert finished(stack, data["id"])["outputs"] == [raw]


def test_input_forms(stack: Any, image_host: tuple[str, dict[str, Any]]) -> None:
    host, routes = image_host
    routes["/cat.png"] = (200, png_bytes((96, 64)), {"Content-Type": "image/png"})
    forms = {
        "url": f"{host}/cat.png",
        "data_uri": data_uri(png_bytes((64, 96), fmt="JPEG"), "image/jpeg"),
        "bare_base64": base64.b64encode(png_bytes()).decode(),
    }
    for name, value in forms.items():
        pid = submit(stack, {"prompt": "x", "image": value, "size": "256*256"}).json()["data"]["id"]
        assert finished(stack, pid)["status"] == "completed", name


def test_media_failures_get_their_codes(stack: Any, image_host: tuple[str, dict[str, Any]]) -> None:
    host, routes = image_host
    routes["/page.html"] = (200, b"<html>hello</html>", {"Content-Type": "text/html"})
    missing = finished(stack, submit(stack, {"prompt": "x", "image": f"{host}/missing.png"}).json()["data"]["id"])
    assert missing["status"] == "failed" and missing["code"] == 1402 and "404" in missing["error"]
    html = finished(stack, submit(stack, {"prompt": "x", "image": f"{host}/page.html"}).json()["data"]["id"])
    assert html["status"] == "failed" and html["code"] == 1401 and "image" in html["error"]


def test_random_seed_is_drawn_and_recorded(stack: Any, app_settings: Any) -> None:
    pid = submit(stack, {"prompt": "x", "image": IMAGE, "size": "256*256", "seed": -1}).json()["data"]["id"]
    finished(stack, pid)
    store = JobStore.open(app_settings)
    try:
        job = store.get(pid)
        assert job is not None and 0 <= job.seed <= 2147483647 and job.params.seed == job.seed
    finally:
        store.close()


def test_unknown_fields_client_headers_and_content_types_are_ignored(api: Any) -> None:
    body = {"prompt": "x", "image": IMAGE, "images": ["ignored"], "guidance_scale": 3, "whatever": {"a": 1}}
    headers = {**KEY1, "X-Client-Name": "wavespeed-js", "X-Client-Version": "0.3.2", "X-Client-OS": "linux"}
    assert api.post(MODEL_URL, json=body, headers=headers).status_code == 200
    # curl -d sends a form content type: the body is still read as JSON, as the hosted API does.
    r = api.post(MODEL_URL, content=json.dumps(body), headers={**KEY1, "content-type": "text/plain"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"image": "x"}, "prompt"),
        ({"prompt": "", "image": IMAGE}, "prompt"),
        ({"prompt": "x"}, "image is required"),
        ({"prompt": "x", "image": "not an image at all!"}, "image"),
        ({"prompt": "x", "image": "data:image/png;base64,AAAAAAAAAAAAAAAAAAAAAAAA"}, "image"),
        ({"prompt": "x", "image": "ftp://example.com/a.png"}, "image"),
        ({"prompt": "x", "image": IMAGE, "size": "100*100"}, "size"),
        ({"prompt": "x", "image": IMAGE, "size": "big"}, "size"),
        ({"prompt": "x", "image": IMAGE, "seed": -2}, "seed"),
        ({"prompt": "x", "image": IMAGE, "seed": 1.5}, "seed"),
        ({"prompt": "x", "image": IMAGE, "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "image": IMAGE, "enable_sync_mode": "yes"}, "enable_sync_mode"),
        ({"prompt": 5, "image": IMAGE}, "prompt"),
    ],
)
def test_bad_bodies_are_400_in_the_envelope(api: Any, body: dict[str, Any], fragment: str) -> None:
    assert_error(submit(api, body), 400, fragment)


def test_malformed_json_is_400(api: Any) -> None:
    headers = {**KEY1, "content-type": "application/json"}
    assert_error(api.post(MODEL_URL, content=b"{not json", headers=headers), 400, "json")
    assert_error(api.post(MODEL_URL, content=b"[1, 2]", headers=headers), 400)


def test_base64_output_with_webhook_is_rejected(api: Any) -> None:
    r = submit(api, {"prompt": "x", "image": IMAGE, "enable_base64_output": True}, params={"webhook": "http://x.co/h"})
    assert_error(r, 400, "webhook")


def test_auth(api: Any) -> None:
    body = {"prompt": "x", "image": IMAGE}
    assert_error(api.post(MODEL_URL, json=body), 401)
    assert_error(api.post(MODEL_URL, json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(api.post(MODEL_URL, json=body, headers={"Authorization": "Basic dGVzdA=="}), 401)
    assert_error(api.get("/api/v3/predictions/abc/result"), 401)
    assert api.post(MODEL_URL, json=body, headers={"Authorization": "Bearer test-key-2"}).status_code == 200


def test_unknown_prediction_and_model_are_404(api: Any) -> None:
    assert_error(api.get("/api/v3/predictions/doesnotexist/result", headers=KEY1), 404)
    assert_error(api.get("/api/v2/predictions/doesnotexist/result", headers=KEY1), 404)
    assert_error(api.post("/api/v3/wavespeed-ai/flux-dev", json={"prompt": "x"}, headers=KEY1), 404, "not served")
    r = api.post("/api/v3/wavespeed-ai/qwen-image/edit-plus", json={"prompt": "x", "images": []}, headers=KEY1)
    assert_error(r, 404, "not enabled")


def test_sync_mode_that_times_out_answers_5004_and_the_job_goes_on(tmp_path: Any, fake_runner: Any) -> None:
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from tests.support import ThreadWorker, settings_for

    settings = settings_for(tmp_path / "data", sync_timeout_s=0.3)
    with TestClient(create_app(settings)) as client:
        worker = ThreadWorker(settings, fake_runner).start()
        try:
            r = submit(client, {"prompt": "hang", "image": IMAGE, "size": "256*256", "enable_sync_mode": True})
            timed_out = r.json()["data"]
            assert r.status_code == 200 and timed_out["status"] == "processing" and timed_out["code"] == 5004
            assert timed_out["error"] == (
                "Sync mode timed out after 0.3 seconds. The prediction is still processing asynchronously."
            )
            fake_runner.release.set()
            assert finished(client, timed_out["id"])["status"] == Status.COMPLETED.value
        finally:
            worker.stop()


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"prompt": "x", "image": data_uri(png_bytes((1, 5000)))}, "too elongated"),
        ({"prompt": "x", "image": data_uri(png_bytes((5000, 1)))}, "too elongated"),
        ({"prompt": "\ud800 lone", "image": IMAGE}, "unicode"),
        ({"prompt": "x", "image": IMAGE, "negative_prompt": "\udfff"}, "unicode"),
    ],
)
def test_inputs_the_pipeline_would_refuse_are_400_at_submit(api: Any, body: dict[str, Any], fragment: str) -> None:
    r = api.post(MODEL_URL, content=json.dumps(body), headers={**KEY1, "content-type": "application/json"})
    assert_error(r, 400, fragment)


def test_a_stored_input_is_not_derivable_from_an_output_link(stack: Any, app_settings: Any) -> None:
    pid = submit(stack, {"prompt": "x", "image": IMAGE, "size": "256*256"}).json()["data"]["id"]
    output = finished(stack, pid)["outputs"][0]
    store = JobStore.open(app_settings)
    try:
        job = store.get(pid)
    finally:
        store.close()
    assert job is not None
    (key,) = job.params.stored_keys()
    # The job id is in the output's link; the input's name has a random part of its own.
    assert pid in output and key.startswith(f"inputs/{pid[:2]}/{pid}-")  # a shared folder: no folder per submit
    assert re.fullmatch(rf"inputs/{pid[:2]}/{pid}-0-[A-Za-z0-9_-]{{16}}\.png", key), key
    assert stack.get(f"/files/inputs/{pid}/0.png").status_code == 404


def test_unknown_routes_are_404_and_known_paths_with_other_methods_405(api: Any) -> None:
    r = api.post("/api/v3/webhook/secret", headers=KEY1)
    assert_error(r, 405)
    assert r.headers["allow"] == "GET"
    assert_error(api.get("/api/v3/models-that-do-not-exist", headers=KEY1), 404, "not found")
    assert_error(api.delete(f"/api/v3/predictions/{'0' * 32}/result", headers=KEY1), 405)
