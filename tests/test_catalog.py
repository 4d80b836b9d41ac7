"""The catalog (server/api/catalog.py) and its v3 rendering (GET /api/v3/models[/id]), in process:
every served model id with a request schema derived from EditRequest and narrowed by the settings;
a body built from the schema alone is accepted; unknown routes answer 404, known paths 405 + Allow."""

from __future__ import annotations

from typing import Any

import pytest

from server.api.catalog import catalog
from server.api.schemas import EditRequest
from tests.support import KEY1, data_uri, png_bytes, settings_for


def models(api: Any) -> dict[str, dict[str, Any]]:
    r = api.get("/api/v3/models", headers=KEY1)
    assert r.status_code == 200, r.text
    return {m["model_id"]: m for m in r.json()["data"]}


def schema_of(model: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = model["api_schema"]["api_schemas"][0]["request_schema"]
    return schema


def test_lists_every_served_model_in_the_clients_shape(api: Any) -> None:
    found = models(api)
    assert list(found) == ["wavespeed-ai/qwen-image/edit", "wavespeed-ai/qwen-image/edit-lora"]
    for model_id, model in found.items():
        assert model["name"] and model["description"] and model["type"] == "image-to-image"
        assert model["base_price"] == 0.0  # no QWEN_EDIT_PRICES: no charge
        run = model["api_schema"]["api_schemas"][0]
        assert run["method"] == "POST" and run["api_path"] == f"/api/v3/{model_id}"
        schema = run["request_schema"]
        assert schema["required"] == ["prompt", "image"]
        assert schema["x-order-properties"] == list(schema["properties"])
        assert "$ref" not in str(schema) and "anyOf" not in str(schema)  # the CLI reads `type` directly
    plain, lora = (schema_of(found[m])["properties"] for m in found)
    assert "loras" not in plain and "images" not in plain
    assert lora["loras"]["type"] == "array" and lora["loras"]["items"]["properties"]["path"]["type"] == "string"


def test_the_schema_is_edit_requests_own(api: Any) -> None:
    props = schema_of(models(api)["wavespeed-ai/qwen-image/edit-lora"])["properties"]
    assert set(EditRequest.model_fields) - set(props) == {"images"}  # the single-image variant's other field
    assert props["seed"]["minimum"] == -1 and props["output_format"]["enum"] == ["jpeg", "png", "webp"]
    assert props["num_inference_steps"]["default"] == 2  # the server's default_steps


def test_a_body_from_the_schema_alone_is_accepted(api: Any) -> None:
    schema = schema_of(models(api)["wavespeed-ai/qwen-image/edit"])
    body = {name: schema["properties"][name].get("default") for name in schema["properties"]}
    body = {k: v for k, v in body.items() if v is not None} | {"prompt": "make it blue", "image": data_uri(png_bytes())}
    assert set(schema["required"]) <= set(body)
    r = api.post("/api/v3/wavespeed-ai/qwen-image/edit", json=body, headers=KEY1)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "app_settings", [{"allow_overrides": False, "max_prompt_chars": 300, "embedded_workers": 0}], indirect=True
)
def test_settings_narrow_the_schema(api: Any) -> None:
    props = schema_of(models(api)["wavespeed-ai/qwen-image/edit"])["properties"]
    assert props["prompt"]["maxLength"] == 300
    assert not {"num_inference_steps", "true_cfg_scale", "negative_prompt"} & set(props)


def test_multi_image_variants_take_images(tmp_path: Any) -> None:
    settings = settings_for(tmp_path, variants=["edit", "edit-plus", "edit-2511"], embedded_workers=0)
    entries = {e.model_id: e for e in catalog(settings)}
    assert len(entries) == 6
    plus = entries["wavespeed-ai/qwen-image/edit-plus"].request_schema
    assert plus["required"] == ["prompt", "images"] and plus["properties"]["images"]["maxItems"] == 3
    assert "image" not in plus["properties"]


def test_one_model_by_id(api: Any) -> None:
    r = api.get("/api/v3/models/wavespeed-ai/qwen-image/edit-lora", headers=KEY1)
    assert r.status_code == 200 and r.json()["data"]["model_id"] == "wavespeed-ai/qwen-image/edit-lora"
    r = api.get("/api/v3/models/wavespeed-ai/qwen-image/edit-plus", headers=KEY1)  # a family member not served
    assert r.status_code == 404 and "not served" in r.json()["message"]
    assert api.get("/api/v3/models").status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/api/v3/no-such-thing", 404, None),
        ("GET", "/api/v3/wavespeed-ai/qwen-image/edit", 405, "POST"),
        ("GET", "/api/v3/predictions", 405, "POST"),
        ("DELETE", "/api/v3/models", 405, "GET"),
        ("GET", "/api/v3/balance/extra", 404, None),
        ("PUT", "/nowhere", 404, None),
    ],
)
def test_unknown_routes_404_known_paths_405(api: Any, method: str, path: str, status: int, allow: str | None) -> None:
    r = api.request(method, path, headers=KEY1)
    assert r.status_code == status, r.text
    assert r.headers.get("allow") == allow
    assert r.json()["code"] == status
