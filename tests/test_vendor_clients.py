"""The vendor's own clients, and the others users point at the hosted API, against this server with
only the base URL changed (README "Clients"): the published CLI (@wavespeed/cli: models, schema,
run, history, show, balance, price, delete), the MCP server (@wavespeed/mcp through an MCP client:
list_models, get_model_schema, run_model, get_prediction, get_price, get_balance), the OpenAI JS
and Python SDKs with their default retries (a failed job and a sync timeout are one job each),
@huggingface/inference with urlTransform, and the old Python SDK 1.0.10 (multipart upload).

All of them share one module server: the real app over real HTTP (uvicorn in a thread of this
process) with a real worker loop running the fake runner, whose prompt words make a job fail or
hang; no model, no fresh interpreter to start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.jobs.store import JobStore
from server.settings import Settings
from tests.support import (
    API_KEY,
    JS_DIR,
    KEY1,
    MODEL,
    FakeRunner,
    ThreadWorker,
    data_uri,
    free_port,
    png_bytes,
    require_js,
    run_js,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.e2e
SYNC_TIMEOUT_S = 3.0  # the OpenAI door's hold: the "hang" prompt outlasts it


@dataclass
class Live:
    url: str
    settings: Settings
    runner: FakeRunner
    image: Path

    def jobs(self) -> int:
        store = JobStore.open(self.settings)
        try:
            return sum(store.count_by_status().values())
        finally:
            store.close()

    def cancel(self, pid: str) -> None:
        """Cancel a hung job and wait until it has ended (the one worker is free again)."""
        r = httpx.post(f"{self.url}/api/v3/predictions/{pid}/cancel", headers=KEY1)
        assert r.status_code == 200, r.text

        def ended() -> bool:
            got = httpx.get(f"{self.url}/api/v3/predictions/{pid}/result", headers=KEY1)
            return bool(got.json()["data"]["status"] == "failed")

        wait_for(ended, 60, f"{pid} to end")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    import uvicorn

    from server.api.app import create_app

    root = tmp_path_factory.mktemp("vendor")
    settings = settings_for(root / "data", sync_timeout_s=SYNC_TIMEOUT_S)
    runner = FakeRunner()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="vendor-api", daemon=True)
    thread.start()
    wait_for(lambda: server.started, 60, "the API to start")
    worker = ThreadWorker(settings, runner).start()
    image = root / "in.png"
    image.write_bytes(png_bytes((96, 64)))
    try:
        yield Live(f"http://127.0.0.1:{port}", settings, runner, image)
    finally:
        runner.release.set()
        worker.stop()
        server.should_exit = True
        thread.join(30)


# --- @wavespeed/cli ------------------------------------------------------------------------------


def cli(home: Path, *args: str) -> Any:
    """One published-CLI command with --json; its JSON output."""
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "WAVESPEED_API_KEY": API_KEY}
    entry = JS_DIR / "node_modules" / "@wavespeed" / "cli" / "dist" / "cli.js"
    proc = subprocess.run(["node", str(entry), *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"wavespeed {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout) if "--json" in args else proc.stdout


def test_the_published_cli(live: Live, tmp_path: Path) -> None:
    require_js()
    # The published CLI reads its base URL from its config only (not WAVESPEED_BASE_URL).
    assert live.url in cli(tmp_path, "config", "--base-url", live.url)
    models = cli(tmp_path, "models", "--json", "--no-cache")
    assert [m["model_id"] for m in models] == [MODEL, MODEL + "-lora"]
    schema = cli(tmp_path, "schema", MODEL, "--json")
    assert schema["required"] == ["prompt", "image"] and "size" in schema["properties"]
    image = data_uri(png_bytes((96, 64)))
    ran = cli(tmp_path, "run", MODEL, "-p", "make it blue", "-i", f"image={image}", "-i", "size=256*256", "--json")
    assert len(ran["outputs"]) == 1 and httpx.get(ran["outputs"][0]).status_code == 200
    history = cli(tmp_path, "history", "--json")
    newest = history["items"][0]
    assert history["page"] == 1 and newest["outputs"] == ran["outputs"] and newest["input"]["prompt"] == "make it blue"
    pid = newest["id"]
    assert cli(tmp_path, "show", pid, "--json")["outputs"] == ran["outputs"]
    assert cli(tmp_path, "balance", "--json")["balance"] == 0
    price = cli(tmp_path, "price", MODEL, "-p", "x", "--json")
    assert price["model_id"] == MODEL and price["unit_price"] == 0
    assert cli(tmp_path, "delete", pid, "--json") == {"deleted": [pid]}
    assert httpx.get(f"{live.url}/api/v3/predictions/{pid}/result", headers=KEY1).status_code == 404


# --- @wavespeed/mcp ------------------------------------------------------------------------------


def test_the_mcp_server_through_an_mcp_client(live: Live, tmp_path: Path) -> None:
    require_js()
    out = run_js_env("mcp.js", {"HOME": str(tmp_path)}, live.url, API_KEY, data_uri(png_bytes((96, 64))))
    assert {"list_models", "get_model_schema", "run_model"} <= set(out["tools"])
    assert [m["model_id"] for m in out["listed"]["models"]] == [MODEL, MODEL + "-lora"]
    assert out["schema"]["required"] == ["prompt", "image"] and out["schema"]["property_order"][0] == "prompt"
    assert out["ran"]["status"] == "completed" and len(out["ran"]["outputs"]) == 1
    assert out["fetched"]["id"] == out["ran"]["id"] and out["fetched"]["outputs"] == out["ran"]["outputs"]
    assert out["price"]["model_id"] == MODEL and out["price"]["price"] == 0 and out["price"]["unpriced_inputs"] == []
    assert out["balance"]["balance"] == 0 and out["balance"]["limited"] is False


def run_js_env(script: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        ["node", script, *args], cwd=JS_DIR, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"node {script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- OpenAI SDKs: one call, one job ---------------------------------------------------------------


def prediction_id(message: str) -> str:
    found = re.search(r"[Pp]rediction ([0-9a-f]{32})", message)
    assert found, message
    return found.group(1)


def test_the_openai_js_sdk_makes_one_job_per_call(live: Live) -> None:
    require_js()
    before = live.jobs()
    out = run_js("openai.js", live.url, API_KEY, str(live.image), "an edit", "raise", "hang")
    ok, failed, timed_out = out["outcomes"]
    try:
        assert ok["ok"] and ok["images"] == 1 and ok["url"].startswith(live.url)
        assert failed["status"] == 500 and failed["shouldRetry"] == "false"
        assert timed_out["status"] == 504 and timed_out["shouldRetry"] == "false"
        assert live.jobs() - before == 3  # the SDK's two retries never ran
    finally:
        live.cancel(prediction_id(timed_out["message"]))
    done = httpx.get(f"{live.url}/api/v3/predictions/{prediction_id(failed['message'])}/result", headers=KEY1)
    assert done.json()["data"]["status"] == "failed"


def test_the_openai_python_sdk_makes_one_job_per_call(live: Live) -> None:
    import openai

    client = openai.OpenAI(api_key=API_KEY, base_url=f"{live.url}/v1")  # default retries: 2
    before = live.jobs()
    for prompt, error in (("raise", openai.InternalServerError), ("hang", openai.APIStatusError)):
        with pytest.raises(error) as caught:
            client.images.edit(image=live.image.open("rb"), prompt=prompt, size="256x256")  # type: ignore[arg-type]
        if prompt == "hang":
            assert caught.value.status_code == 504
            live.cancel(prediction_id(str(caught.value)))
    assert live.jobs() - before == 2


# --- @huggingface/inference ------------------------------------------------------------------------


def test_huggingface_inference_with_url_transform(live: Live) -> None:
    require_js()
    out = run_js("hf.js", live.url, API_KEY, str(live.image))
    assert out["type"].startswith("image/") and out["bytes"] > 0
    assert out["resultPolls"] >= 2  # the job outlived the first poll: the client waited and polled again
    assert out["hubLookups"] == [
        "https://huggingface.co/api/models/Qwen/Qwen-Image-Edit?expand[]=inferenceProviderMapping"
    ]


# --- the old Python SDK (wavespeed 1.0.10) -----------------------------------------------------------


def test_the_old_python_sdk_1_0_10(live: Live, tmp_path: Path) -> None:
    target = tmp_path / "sdk"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), "wavespeed==1.0.10"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if pip.returncode != 0:
        pytest.skip(f"wavespeed==1.0.10 cannot be installed from PyPI here: {pip.stderr.strip()[-300:]}")
    script = (
        "import json, sys, wavespeed\n"
        "client = wavespeed.Client(api_key=sys.argv[2], base_url=sys.argv[1])\n"
        "url = client.upload(sys.argv[3])\n"
        "out = client.run(sys.argv[4], {'prompt': 'make it blue', 'image': url, 'size': '256*256'}, poll_interval=0.2)\n"
        "print(json.dumps({'version': wavespeed.__version__, 'upload': url, 'out': out}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, live.url, API_KEY, str(live.image), MODEL],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"] == "1.0.10"
    assert result["upload"].startswith(live.url) and len(result["out"]["outputs"]) == 1
