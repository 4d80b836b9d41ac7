"""Every endpoint end to end on tiny models of each variant, LoRAs through the -lora endpoints,
and the 404 of endpoints whose variant is not configured."""

from __future__ import annotations

import base64
import contextlib
import io
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import build_tiny_lora, data_uri, png_bytes

pytestmark = pytest.mark.e2e

PREFIX = "wavespeed-ai/qwen-image/"


def _pixels(data: dict[str, Any]) -> np.ndarray:
    assert data["status"] == "completed", data
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data["outputs"][0]))).convert("RGB"), dtype=np.int16)


def _run(srv: Any, model: str, body: dict[str, Any]) -> dict[str, Any]:
    base = {"prompt": "make it blue", "seed": 11, "size": "256*256", "output_format": "png"}
    r = srv.submit({**base, **body, "enable_sync_mode": True, "enable_base64_output": True}, model=PREFIX + model)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    assert data["model"] == PREFIX + model
    return data


def test_every_endpoint_on_its_variant(make_server: Any, tiny_family: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "loras"  # the server's LoRA folder: clients name files inside it
    build_tiny_lora(folder / "edit")
    (tmp_path / "lora-outside.safetensors").write_bytes((folder / "edit" / "tiny_lora.safetensors").read_bytes())
    lora = "edit/tiny_lora.safetensors"
    models = ",".join(f"{v}={p}" for v, p in tiny_family.items())
    srv = make_server(
        QWEN_EDIT_VARIANTS="edit,edit-plus,edit-2511",
        QWEN_EDIT_MODELS=models,
        QWEN_EDIT_EMBEDDED_WORKERS="3",
        QWEN_EDIT_WARMUP="false",
        QWEN_EDIT_LORA_DIRS=str(folder),
    )
    img = data_uri(png_bytes())
    img2 = data_uri(png_bytes(color=(10, 200, 10)))

    edit = _pixels(_run(srv, "edit", {"image": img}))
    # The -lora endpoint without loras is the base model; with the LoRA it differs.
    assert np.array_equal(_pixels(_run(srv, "edit-lora", {"image": img})), edit)
    with_lora = _pixels(_run(srv, "edit-lora", {"image": img, "loras": [{"path": lora, "scale": 1.0}]}))
    assert np.abs(with_lora - edit).max() > 0
    # Unloaded after the job: the next base job gives the base pixels again.
    assert np.array_equal(_pixels(_run(srv, "edit", {"image": img})), edit)

    plus = _pixels(_run(srv, "edit-plus", {"images": [img, img2]}))
    assert plus.shape == (256, 256, 3)
    assert _pixels(_run(srv, "edit-2511", {"images": [img, img2, img]})).shape == (256, 256, 3)
    plus_lora = str(build_tiny_lora(folder / "plus", "edit-plus").relative_to(folder))
    changed = _pixels(_run(srv, "edit-plus-lora", {"images": [img, img2], "loras": [{"path": plus_lora, "scale": 2}]}))
    assert np.abs(changed - plus).max() > 0
    _pixels(_run(srv, "edit-2511-lora", {"images": [img], "loras": [{"path": plus_lora, "scale": 0.5}]}))

    # A LoRA outside the folders, or not in them, is a 400 with one and the same message.
    for path in ("none.safetensors", str(tmp_path / "elsewhere.safetensors"), "../lora-outside.safetensors"):
        r = srv.submit({"prompt": "x", "image": img, "loras": [{"path": path}]}, model=PREFIX + "edit-lora")
        assert r.status_code == 400 and "is not one this server offers" in r.json()["message"], r.text
    # loras on a non-lora endpoint, and too many images, are 400s.
    r = srv.submit({"prompt": "x", "image": img, "loras": [{"path": lora}]}, model=PREFIX + "edit")
    assert r.status_code == 400 and "-lora endpoints" in r.json()["message"]
    r = srv.submit({"prompt": "x", "images": [img] * 4}, model=PREFIX + "edit-plus")
    assert r.status_code == 400


def test_unconfigured_variant_is_404(make_server: Any) -> None:
    # API only (workers elsewhere, so never "ready" here): the served set is the configured one.
    srv = make_server(start=False, QWEN_EDIT_EMBEDDED_WORKERS="0", QWEN_EDIT_VARIANTS="edit-2511")
    srv.start(wait_ready=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(srv.url + "/livez", timeout=2).status_code == 200:
                break
        time.sleep(0.2)
    for model in ("edit", "edit-lora", "edit-plus", "edit-plus-lora"):
        r = httpx.post(f"{srv.url}/api/v3/{PREFIX}{model}", json={"prompt": "x", "image": "aGk="}, headers=srv.headers)
        assert r.status_code == 404, model
        body = r.json()
        assert "not enabled on this server" in body["message"] and PREFIX + "edit-2511" in body["message"]
    r = httpx.post(f"{srv.url}/api/v3/{PREFIX}edit-9999", json={"prompt": "x"}, headers=srv.headers)
    assert r.status_code == 404 and "not served here" in r.json()["message"]
