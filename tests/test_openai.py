"""The OpenAI-compatible ``POST /v1/images/edits``, driven by the official ``openai`` SDK and raw HTTP
against the real server and the tiny model."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.support import API_KEY, ServerProc, png_bytes

pytestmark = pytest.mark.e2e


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(png_bytes())
    return path


def client(server: ServerProc, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=server.url + "/v1", max_retries=0, timeout=120)


def test_sdk_edit_returns_url(server: ServerProc, image_file: Path) -> None:
    with image_file.open("rb") as fh:
        result = client(server).images.edit(image=fh, prompt="make it blue", size="1024x1024", response_format="url")
    assert result.created > 0
    assert result.data is not None and len(result.data) == 1
    url = result.data[0].url
    assert url is not None and url.startswith(server.url + "/files/outputs/") and url.endswith(".png")
    img = Image.open(io.BytesIO(httpx.get(url, timeout=10).content))
    assert img.format == "PNG" and img.size == (1024, 1024)


def test_sdk_edit_returns_b64_json_with_n_and_seed_chain(server: ServerProc, image_file: Path) -> None:
    with image_file.open("rb") as fh:
        result = client(server).images.edit(
            image=fh,
            prompt="make it blue",
            n=2,
            size="256x320",
            response_format="b64_json",
            output_format="webp",
            model="wavespeed-ai/qwen-image/edit",
        )
    assert result.data is not None and len(result.data) == 2
    images = []
    for item in result.data:
        assert item.b64_json and item.url is None
        raw = base64.b64decode(item.b64_json)
        img = Image.open(io.BytesIO(raw))
        assert img.format == "WEBP" and img.size == (256, 320)
        images.append(raw)
    assert images[0] != images[1]  # n jobs run with different seeds


def test_same_seed_gives_same_image_and_auto_size_follows_input(server: ServerProc) -> None:
    def edit() -> bytes:
        r = httpx.post(
            server.url + "/v1/images/edits",
            headers=server.headers,
            files={"image": ("a.png", png_bytes((320, 256)), "image/png")},
            data={"prompt": "x", "seed": "7", "size": "auto", "response_format": "b64_json", "model": "gpt-image-1"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return base64.b64decode(r.json()["data"][0]["b64_json"])

    first, second = edit(), edit()
    assert first == second
    assert Image.open(io.BytesIO(first)).size[0] > 0


def test_errors_are_openai_shaped(server: ServerProc, image_file: Path) -> None:
    with pytest.raises(openai.AuthenticationError) as auth, image_file.open("rb") as fh:
        client(server, key="wrong").images.edit(image=fh, prompt="x")
    assert auth.value.status_code == 401
    assert auth.value.body is not None and auth.value.body["code"] == "invalid_api_key"  # type: ignore[index]

    def post(data: dict[str, str], files: dict[str, tuple[str, bytes, str]] | None = None) -> httpx.Response:
        return httpx.post(server.url + "/v1/images/edits", headers=server.headers, data=data, files=files, timeout=30)

    img = {"image": ("a.png", png_bytes(), "image/png")}
    cases = [
        (post({"prompt": "x"}), "image is required"),
        (post({}, img), "prompt"),
        (post({"prompt": "x", "size": "big"}, img), "size"),
        (post({"prompt": "x", "size": "99x99"}, img), "size"),
        (post({"prompt": "x", "n": "11"}, img), "n must be"),
        (post({"prompt": "x", "response_format": "gif"}, img), "response_format"),
        (post({"prompt": "x", "output_format": "bmp"}, img), "output_format"),
        (post({"prompt": "x"}, {"image": ("a.png", b"not an image", "image/png")}), "image"),
    ]
    for resp, needle in cases:
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert set(err) >= {"message", "type", "code"} and err["type"] == "invalid_request_error"
        assert needle in err["message"], err["message"]

    with pytest.raises(openai.BadRequestError), image_file.open("rb") as fh:
        client(server).images.edit(image=fh, prompt="")
    # A family member this server does not serve: 404 in the same shape.
    r = post({"prompt": "x", "model": "wavespeed-ai/qwen-image/edit-plus"}, img)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_openapi_documents_every_front_door(server: ServerProc) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    paths = spec["paths"]
    assert "/v1/images/edits" in paths
    edits = paths["/v1/images/edits"]["post"]
    assert "multipart/form-data" in edits["requestBody"]["content"]
    assert edits["responses"]["200"]["content"]["application/json"]["example"]["data"]
    for path in (
        "/api/v3/wavespeed-ai/qwen-image/edit",
        "/api/v3/predictions/{prediction_id}/result",
        "/api/v3/media/uploads",
        "/api/v3/media/upload/binary",
        "/playground/config",
    ):
        assert path in paths, path
    # Examples matching API.md: the envelopes and the v3 error shape.
    examples = spec["components"]["schemas"]["PredictionEnvelope"]["examples"]
    assert {e["data"]["status"] for e in examples} == {"created", "processing", "completed"}
    assert spec["components"]["schemas"]["UploadEnvelope"]["examples"][0]["data"]["upload"]["method"] == "PUT"
    result_401 = paths["/api/v3/predictions/{prediction_id}/result"]["get"]["responses"]["401"]
    example = result_401["content"]["application/json"]["example"]
    assert set(example) == {"code", "message", "data", "error"} and example["code"] == 401
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200

    # The Playground's config: what it offers here (the -lora endpoint is served, so LoRA inputs show).
    config = httpx.get(server.url + "/playground/config", timeout=10).json()
    assert config["models"] == ["wavespeed-ai/qwen-image/edit"]
    assert config["lora_models"] == ["wavespeed-ai/qwen-image/edit-lora"]
    assert config["allow_overrides"] is True and config["default_steps"] == 2
