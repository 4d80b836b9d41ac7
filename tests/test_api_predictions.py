"""Submit and result end to end: the real server, the tiny diffusers pipeline, the official
``wavespeed`` SDK. (The contract to the field, in process with a fake runner: tests/test_api.py.)
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import pytest
import wavespeed
from PIL import Image

from tests.support import API_KEY, ServerProc, data_uri, png_bytes, python_sdk_chain, require_js, run_js

pytestmark = pytest.mark.e2e

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


def test_size_follows_input_when_absent(server: ServerProc) -> None:
    data = server.submit({"prompt": "x", "image": data_uri(png_bytes((128, 64))), "enable_sync_mode": True}).json()[
        "data"
    ]
    img = fetch_image(data["outputs"][0])
    # ~1 MP at the input's 2:1 aspect, sides multiples of 16, like the pipeline's own default.
    w, h = img.size
    assert abs(w / h - 2.0) < 0.1 and 0.8e6 < w * h < 1.2e6


def test_seed_is_recorded_and_reproducible(server: ServerProc) -> None:
    body = {
        "prompt": "same",
        "image": data_uri(png_bytes()),
        "size": "256*256",
        "seed": 9999999998,  # WaveSpeed's ComfyUI node sends seeds up to this (tests/test_seeds.py)
        "output_format": "png",
        "enable_sync_mode": True,
    }
    a = server.submit(body).json()["data"]
    b = server.submit(body).json()["data"]
    c = server.submit({**body, "seed": 4321}).json()["data"]
    pa, pb, pc = (httpx.get(d["outputs"][0]).content for d in (a, b, c))
    assert pa == pb  # same input, prompt and seed: same bytes
    assert a["seed"] == b["seed"] == 9999999998 and c["seed"] == 4321
    assert pa != pc


def test_sdk_reports_failed_prediction(server: ServerProc, image_host: tuple[str, dict]) -> None:
    host, _ = image_host
    client = wavespeed.Client(api_key=API_KEY, base_url=server.url)
    with pytest.raises(RuntimeError, match="failed"):
        client.run(MODEL, {"prompt": "x", "image": f"{host}/nothing-here.png"}, poll_interval=0.2)


@pytest.mark.parametrize("sync", [False, True])
def test_three_chained_edits_with_the_python_and_js_sdks(server: ServerProc, tmp_path: Path, sync: bool) -> None:
    """The most common editing workflow, as the hosted API's clients run it: each output is the
    next edit's input (read from storage by the server, never fetched back over HTTP)."""
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes((96, 64)))
    require_js()
    chains = [
        python_sdk_chain(server.url, photo, sync=sync),
        run_js("chain.js", server.url, API_KEY, str(photo), "sync" if sync else "async")["steps"],
    ]
    for steps in chains:
        assert steps[0].startswith(server.url + "/files/uploads/") and len(steps) == 4
        assert all(s.startswith(server.url + "/files/outputs/") for s in steps[1:])
        assert fetch_image(steps[-1]).size == (256, 256)
