"""API keys and who sees what: a prediction belongs to the key that created it; another key gets the
404 an unknown id gets, on its result, cancel and history; admin keys see all; with auth disabled
nothing is private."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from tests.support import KEY1, KEY2, MODEL_URL, data_uri, png_bytes, settings_for

ADMIN = {"Authorization": "Bearer the-admin"}
BODY = {"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256"}


@pytest.fixture
def client(tmp_path: Path) -> Any:
    with TestClient(create_app(settings_for(tmp_path, admin_keys=["the-admin"]))) as c:
        yield c


def test_a_prediction_is_private_to_its_key(client: Any) -> None:
    pid = client.post(MODEL_URL, json=BODY, headers=KEY1).json()["data"]["id"]
    for path in (
        f"/api/v3/predictions/{pid}/result",
        f"/api/v3/predictions/{pid}",
        f"/api/v2/predictions/{pid}/result",
    ):
        assert client.get(path, headers=KEY1).status_code == 200
        other = client.get(path, headers=KEY2)
        unknown = client.get(path.replace(pid, "0" * 32), headers=KEY2)
        assert other.status_code == unknown.status_code == 404
        assert other.json()["message"].replace(pid, "<id>") == unknown.json()["message"].replace("0" * 32, "<id>")
        assert client.get(path, headers=ADMIN).status_code == 200  # admins see every key's
    # Another key cannot cancel it either; the owner still can.
    assert client.post(f"/api/v3/predictions/{pid}/cancel", headers=KEY2).status_code == 404
    assert client.get(f"/api/v3/predictions/{pid}/result", headers=KEY1).json()["data"]["status"] == "created"
    assert client.post(f"/api/v3/predictions/{pid}/cancel", headers=KEY1).json()["data"]["status"] == "failed"


def test_admin_keys_are_api_keys_too(client: Any) -> None:
    assert client.post(MODEL_URL, json=BODY, headers=ADMIN).status_code == 200
    assert client.post(MODEL_URL, json=BODY, headers={"Authorization": "Bearer nobody"}).status_code == 401


def test_with_auth_disabled_nothing_is_private(tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(tmp_path, api_keys=[], auth_disabled=True))) as client:
        pid = client.post(MODEL_URL, json=BODY, headers=KEY1).json()["data"]["id"]
        assert client.get(f"/api/v3/predictions/{pid}/result", headers=KEY2).status_code == 200
        assert client.get(f"/api/v3/predictions/{pid}/result").status_code == 200
