"""The catalogue of WaveSpeed's ComfyUI nodes (``/center/default/api/v1/model_product/...``, asked
without a key), in process: the three calls in the shapes the nodes read, listing exactly the
served models, each detail's request schema the v3 catalog's own (one source), and a body built
from that schema's widgets as the node draws them accepted by the model's submit route."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import KEY1, data_uri, png_bytes

PREFIX = "/center/default/api/v1/model_product"
SERVED = ["wavespeed-ai/qwen-image/edit", "wavespeed-ai/qwen-image/edit-lora"]


def _data(api: Any, path: str, **params: Any) -> Any:
    r = api.get(PREFIX + path, params=params)  # no key: the nodes send none
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 200
    return body["data"]


def test_categories_and_search_list_the_served_models(api: Any) -> None:
    assert _data(api, "/type_statistics") == [{"type": "image-to-image", "count": len(SERVED)}]
    found = _data(api, "/search", page=1, page_size=100, types="image-to-image")
    assert [item["model_uuid"] for item in found["items"]] == SERVED and found["total"] == len(SERVED)
    assert all(item["model_name"] for item in found["items"])
    assert _data(api, "/search", page=1, page_size=100, types="text-to-video")["items"] == []
    assert [i["model_uuid"] for i in _data(api, "/search", page=2, page_size=1)["items"]] == SERVED[1:]


@pytest.mark.parametrize("app_settings", [{"variants": ["edit-plus"], "embedded_workers": 0}], indirect=True)
def test_only_variants_whose_weights_are_configured(api: Any) -> None:
    items = _data(api, "/search", page=1, page_size=100, types="image-to-image")["items"]
    assert [i["model_uuid"] for i in items] == [
        "wavespeed-ai/qwen-image/edit-plus",
        "wavespeed-ai/qwen-image/edit-plus-lora",
    ]
    assert api.get(PREFIX + "/detail/wavespeed-ai/qwen-image/edit").status_code == 404


def _widget_body(schema: dict[str, Any], image: str) -> dict[str, Any]:
    """What the node's widgets hold before the user touches them: every shown property's default,
    plus the required ones filled in (the node hides ``disabled``/``hidden`` ones)."""
    body: dict[str, Any] = {}
    for name in schema["x-order-properties"]:
        prop = schema["properties"][name]
        if prop.get("disabled") or prop.get("hidden"):
            continue
        if "enum" in prop:
            assert prop.get("default") in prop["enum"]
        if "default" in prop:
            body[name] = prop["default"]
    body.update(prompt="make it blue")
    body["images" if "images" in schema["properties"] else "image"] = (
        [image] if "images" in schema["properties"] else image
    )
    assert set(schema["required"]) <= set(body)
    return body


def test_detail_is_the_v3_catalogs_entry_and_its_widgets_submit(api: Any) -> None:
    for model_uuid in SERVED:
        data = _data(api, f"/detail/{model_uuid}")
        assert data["model_uuid"] == model_uuid and data["model_name"] and data["description"]
        assert data["type"] == "image-to-image"
        schema = data["api_schema"]["api_schemas"][0]["request_schema"]
        v3 = api.get(f"/api/v3/models/{model_uuid}", headers=KEY1).json()["data"]
        assert schema == v3["api_schema"]["api_schemas"][0]["request_schema"] == data["input"]  # one source
        assert set(schema["x-order-properties"]) == set(schema["properties"])
        assert schema["properties"]["output_format"]["enum"] == ["jpeg", "png", "webp"]
        assert schema["properties"]["seed"]["minimum"] == -1
        # The node submits the widgets' values to /api/v3/<model_uuid>, a random seed up to 9999999998.
        body = _widget_body(schema, data_uri(png_bytes())) | {"seed": 2**50 % 9999999999}
        r = api.post(f"/api/v3/{model_uuid}", json=body, headers=KEY1)
        assert r.status_code == 200, (model_uuid, r.text)
    r = api.get(PREFIX + "/detail/someone/else/model")
    assert r.status_code == 404 and "not served" in r.json()["message"]
