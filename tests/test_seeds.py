"""Seeds as clients of the hosted API send them (WaveSpeed's ComfyUI node: ``seed % 9999999999`` of
a GUI seed up to 2**50): every integer >= -1 accepted, reduced modulo 2**53, the seed used recorded
in the result; same seed, same pixels. In process (fake runner); the real model's same-seed check
(tests/test_api_predictions.py) runs with such a seed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from server.api import seeds
from tests.support import KEY1, MODEL_URL, data_uri, png_bytes, wait_for

IMAGE = data_uri(png_bytes())
COMFYUI_MAX = 9999999998  # the largest seed the node sends (seed % 9999999999)


def _done(client: Any, pid: str) -> dict[str, Any]:
    def done() -> Any:
        data = client.get(f"/api/v3/predictions/{pid}/result", headers=KEY1).json()["data"]
        return data if data["status"] in ("completed", "failed") else None

    return wait_for(done, 30, pid)  # type: ignore[no-any-return]


def _edit(client: Any, seed: int) -> tuple[dict[str, Any], bytes]:
    r = client.post(MODEL_URL, json={"prompt": "x", "image": IMAGE, "size": "256*256", "seed": seed}, headers=KEY1)
    assert r.status_code == 200, r.text
    created = r.json()["data"]
    data = _done(client, created["id"])
    assert data["status"] == "completed", data
    assert created["seed"] == data["seed"]  # known from the first answer on
    return data, client.get(data["outputs"][0]).content


def test_reduction_rule() -> None:
    assert seeds.resolve(0) == 0 and seeds.resolve(2**31) == 2**31 and seeds.resolve(COMFYUI_MAX) == COMFYUI_MAX
    assert seeds.resolve(2**53 + 7) == 7 and seeds.resolve(2**200 + 5) == 5
    assert all(0 <= seeds.resolve(-1) < 2**31 for _ in range(50))
    with pytest.raises(ValueError):
        seeds.resolve(-2)
    # Every seed the rule yields is one the generator takes, and it draws the same noise from it.
    for seed in (seeds.SEED_SPACE - 1, COMFYUI_MAX):
        a = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(seed)))


def test_hosted_client_seeds_are_accepted_reduced_and_recorded(stack: Any) -> None:
    data, big = _edit(stack, COMFYUI_MAX)
    assert data["seed"] == COMFYUI_MAX  # below 2**53: used as sent
    wrapped, same = _edit(stack, COMFYUI_MAX + 2**53)
    assert wrapped["seed"] == COMFYUI_MAX and same == big  # reduced deterministically: same pixels
    other, different = _edit(stack, COMFYUI_MAX - 1)
    assert other["seed"] == COMFYUI_MAX - 1 and different != big
    drawn, _ = _edit(stack, -1)
    assert 0 <= drawn["seed"] < 2**31
    r = stack.post(MODEL_URL, json={"prompt": "x", "image": IMAGE, "seed": -2}, headers=KEY1)
    assert r.status_code == 400 and "seed" in r.json()["message"]


def test_openai_door_takes_the_same_seeds(stack: Any) -> None:
    files = {"image": ("in.png", png_bytes(), "image/png")}
    form = {"prompt": "x", "size": "256x256", "n": "2", "seed": str(COMFYUI_MAX)}
    r = stack.post("/v1/images/edits", files=files, data=form, headers=KEY1)
    assert r.status_code == 200, r.text
    assert [item["seed"] for item in r.json()["data"]] == [COMFYUI_MAX, COMFYUI_MAX + 1]
    r = stack.post("/v1/images/edits", files=files, data={**form, "seed": "-2"}, headers=KEY1)
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
