"""Big submit bodies are parsed, decoded, probed and stored in a helper process, off the API's
event loop (server/api/bigbody.py, server/media/prepare.py). Timing is benchmarks/contention.py's;
here the behaviours: a poll answers while a big body is in a helper, the job is the same as the
small path makes, errors read the same, refused bodies leave no file behind."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from server.jobs.store import JobStore
from tests.bigbody_gate import GATE_ENV
from tests.support import KEY1, MODEL_URL, data_uri, png_bytes, wait_for

pytestmark = pytest.mark.parametrize("app_settings", [{"body_offload_bytes": 1000, "body_processes": 1}], indirect=True)
NOISE = png_bytes((64, 48), noise=True)
BIG = data_uri(NOISE)  # over the 1000-byte threshold above
JSON = {**KEY1, "content-type": "application/json"}


def post(api: Any, body: dict[str, Any], headers: dict[str, str] = JSON) -> Any:
    return api.post(MODEL_URL, content=json.dumps(body), headers=headers)


def input_files(settings: Any) -> list[Path]:
    root = settings.resolved_storage_dir / "inputs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_a_big_body_is_prepared_in_a_helper_process(api: Any, app_settings: Any) -> None:
    r = post(api, {"prompt": "x", "image": BIG, "size": "256*256"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    pids = api.app.state.body_helpers.pids
    assert pids and os.getpid() not in pids
    store = JobStore.open(app_settings)
    try:
        job = store.get(data["id"])
    finally:
        store.close()
    assert job is not None
    (key,) = job.params.stored_keys()
    assert key.startswith(f"inputs/{data['id'][:2]}/{data['id']}-0-") and key.endswith(".png")
    assert job.input["image"].endswith("/files/" + key)  # the echo links the stored copy, no token
    assert api.get("/files/" + key).content == NOISE


def test_a_poll_answers_while_a_big_body_is_in_the_helper(
    api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = api.post(MODEL_URL, json={"prompt": "x", "image": data_uri(png_bytes((8, 8)))}, headers=KEY1)
    assert small.status_code == 200, small.text
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv(GATE_ENV, str(gate))  # before the helper is spawned: it inherits it
    monkeypatch.setattr("server.api.bigbody.prepare_in_helper", _gated())
    answers: list[Any] = []
    big = threading.Thread(target=lambda: answers.append(post(api, {"prompt": "x", "image": BIG})))
    big.start()
    try:
        wait_for(lambda: (gate / "started").exists(), what="the helper to hold the big body")
        poll = api.get(f"/api/v3/predictions/{small.json()['data']['id']}/result", headers=KEY1)
        assert poll.status_code == 200 and not answers  # answered while the big body was still held
    finally:
        (gate / "go").touch()
        big.join(60)
    assert answers and answers[0].status_code == 200, answers and answers[0].text


def _gated() -> Any:
    from tests.bigbody_gate import gated_prepare

    return gated_prepare


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        ("data:image/png;base64," + "A" * 2001 + "!", "image is not valid base64"),
        (data_uri(b"not an image at all" * 100), "image: not a readable image"),
        (data_uri(png_bytes((1, 3000), noise=True)), "too elongated"),
    ],
)
def test_a_refused_big_body_reads_as_a_small_one_and_leaves_no_file(
    api: Any, app_settings: Any, image: str, fragment: str
) -> None:
    r = post(api, {"prompt": "x", "image": image})
    assert r.status_code == 400 and fragment in r.json()["message"], r.text
    assert input_files(app_settings) == []


def test_a_big_body_the_store_refuses_leaves_no_file(api: Any, app_settings: Any) -> None:
    r = post(api, {"prompt": "x" * 5000, "image": BIG})  # over max_prompt_chars: refused after the images
    assert r.status_code == 400, r.text
    assert input_files(app_settings) == []


def test_a_big_body_without_a_key_never_reaches_a_helper(api: Any) -> None:
    r = post(api, {"prompt": "x", "image": BIG}, headers={"content-type": "application/json"})
    assert r.status_code == 401, r.text
    assert api.app.state.body_helpers.pids == []


def test_a_big_upload_is_probed_in_a_helper_process(api: Any) -> None:
    files = {"file": ("noise.png", NOISE, "image/png")}
    r = api.post("/api/v3/media/upload/binary", files=files, headers=KEY1)
    assert r.status_code == 200, r.text
    assert api.app.state.body_helpers.pids
    bad = api.post("/api/v3/media/upload/binary", files={"file": ("x.png", b"not an image" * 200)}, headers=KEY1)
    assert bad.status_code == 400 and "Only images" in bad.json()["message"], bad.text
