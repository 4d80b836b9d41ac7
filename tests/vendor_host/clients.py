"""Real clients with their built-in default URL, run by tests/test_vendor_host_e2e.py in a process
whose name resolution points the vendor's names at the proxy (pin_hosts.py). Prints one JSON line.

WaveSpeed's ComfyUI nodes (wavespeed-comfyui 1.5.0) are not on PyPI and need ComfyUI itself to
import, so their calls are replayed as the nodes make them, with the libraries, hosts, paths,
headers and timeouts of their code (py/wavespeed_api_endpoints.py: aiohttp, no key;
py/wavespeed_api/client.py: a requests session with urllib3 retries, the hard-coded BASE_URL)."""

from __future__ import annotations

import asyncio
import io
import json
import random
import sys
import time

import aiohttp
import requests
import wavespeed
from huggingface_hub import InferenceClient
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

MODEL = "wavespeed-ai/qwen-image/edit"
CATALOGUE = "https://wavespeed.ai/center/default/api/v1/model_product"
API = "https://api.wavespeed.ai"


async def comfyui_catalogue() -> tuple[str, dict[str, object]]:
    """The GUI's three calls for the Task Create node: a category, its first model, its schema."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{CATALOGUE}/type_statistics") as resp:
            categories = [c["type"] for c in (await resp.json())["data"] if c.get("count", 0) > 0]
        url = f"{CATALOGUE}/search?page=1&page_size=100&types={categories[0]}"
        async with session.get(url) as resp:
            model_uuid = (await resp.json())["data"]["items"][0]["model_uuid"]
        headers = {"User-Agent": "ComfyUI-WaveSpeedAI-API/1.0.0", "Accept": "*/*", "Host": "wavespeed.ai"}
        async with session.get(f"{CATALOGUE}/detail/{model_uuid}", headers=headers, timeout=10) as resp:
            assert resp.status == 200, resp.status
            detail = (await resp.json())["data"]
    schema = detail["api_schema"]["api_schemas"][0]["request_schema"]
    return detail["model_uuid"], schema


def comfyui_workflow(key: str, image_path: str) -> dict[str, object]:
    """Upload (v2), Task Create from the GUI catalogue, submit with the GUI's random seed, poll the
    v2 result, download the output."""
    model_uuid, schema = asyncio.run(comfyui_catalogue())
    session = requests.Session()
    retry = Retry(total=3, backoff_factor=1, status_forcelist=[429, 500, 502, 503, 504], connect=3)
    session.mount("https://", HTTPAdapter(max_retries=retry, pool_connections=10, pool_maxsize=20))
    auth = {"Authorization": f"Bearer {key}"}
    png = io.BytesIO()
    Image.open(image_path).save(png, format="PNG")
    files = {"file": ("image.png", io.BytesIO(png.getvalue()), "image/png")}
    upload = session.post(f"{API}/api/v2/media/upload/binary", headers=auth, files=files, timeout=(15, 180))
    assert upload.status_code == 200 and upload.json()["code"] == 200, upload.text
    image_url = upload.json()["data"]["download_url"]
    # The widgets' defaults, then what the user fills in; the seed as the node sends it.
    body = {name: prop["default"] for name, prop in schema["properties"].items() if "default" in prop}
    body |= {"prompt": "make it blue", "image": image_url, "size": "256*256"}
    body["seed"] = random.randint(0, 2**50) % 9999999999
    headers = {**auth, "Content-Type": "application/json"}
    submitted = session.post(f"{API}/api/v3/{model_uuid}", headers=headers, json=body, timeout=(15, 60))
    assert submitted.status_code == 200 and submitted.json()["code"] == 200, submitted.text
    task_id = submitted.json()["data"]["id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        result = session.get(f"{API}/api/v2/predictions/{task_id}/result", headers=headers, timeout=(10, 30))
        assert result.status_code == 200, result.text
        data = result.json()["data"]
        if data["status"] in ("completed", "failed"):
            break
        time.sleep(1)  # the node's shortest poll interval
    assert data["status"] == "completed", data
    output = requests.get(data["outputs"][0], timeout=30)
    output.raise_for_status()
    return {
        "comfyui_model": model_uuid,
        "comfyui_seed_sent": body["seed"],
        "comfyui_seed_used": data["seed"],
        "comfyui_upload": image_url,
        "comfyui_output": data["outputs"][0],
        "comfyui_output_size": list(Image.open(io.BytesIO(output.content)).size),
    }


def main(key: str, image_path: str) -> None:
    report: dict[str, object] = {}
    # The official Python SDK as its users write it: no base URL anywhere.
    client = wavespeed.Client(api_key=key)
    report["sdk_base_url"] = client.base_url
    uploaded = client.upload(image_path)
    body = {"prompt": "make it blue", "image": uploaded, "size": "256*256", "seed": 9999999998}
    out = client.run(MODEL, body, poll_interval=0.2)
    report["sdk_upload"] = uploaded
    report["sdk_outputs"] = out["outputs"]
    pixels = requests.get(out["outputs"][0], timeout=30)
    pixels.raise_for_status()
    report["sdk_output_size"] = list(Image.open(io.BytesIO(pixels.content)).size)
    # huggingface_hub's provider: the Hub's provider mapping (HF_ENDPOINT), then the provider's own host.
    hf = InferenceClient(provider="wavespeed", api_key=key)
    image = hf.image_to_image(image_path, prompt="add a hat", model="Qwen/Qwen-Image-Edit", num_inference_steps=1)
    report["hf_output_size"] = list(image.size)
    report |= comfyui_workflow(key, image_path)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
