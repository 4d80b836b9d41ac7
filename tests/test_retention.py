"""Retention: old finished jobs, their files and stale uploads go; queued jobs and their inputs stay."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProc, data_uri, png_bytes, server_env
from tests.test_ratelimit import KEY1, MODEL_URL, wait_live


@pytest.fixture
def short_retention(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Any]) -> Iterator[ServerProc]:
    data = tmp_path_factory.mktemp("retention")
    env = server_env(
        data,
        tiny_models["edit"],
        QWEN_EDIT_EMBEDDED_WORKERS="0",  # nothing runs: queued jobs stay queued, however old
        QWEN_EDIT_RETENTION_S="2",
        QWEN_EDIT_RETENTION_INTERVAL_S="0.5",
    )
    srv = wait_live(ServerProc(data_dir=data, env=env))
    yield srv
    srv.stop()


def test_retention_deletes_old_jobs_and_files_only(short_retention: ServerProc) -> None:
    srv = short_retention
    files = srv.data_dir / "files"

    def submit() -> str:
        r = httpx.post(srv.url + MODEL_URL, json={"prompt": "x", "image": data_uri(png_bytes())}, headers=KEY1)
        assert r.status_code == 200, r.text
        return str(r.json()["data"]["id"])

    old, queued = submit(), submit()
    assert (files / "inputs" / old).is_dir() and (files / "inputs" / queued).is_dir()
    cancel = httpx.post(f"{srv.url}/api/v3/predictions/{old}/cancel", headers=KEY1)
    assert cancel.json()["data"].get("status") == "failed", cancel.text  # finished: subject to retention
    up = httpx.post(
        srv.url + "/api/v3/media/upload/binary", files={"file": ("a.png", png_bytes(), "image/png")}, headers=KEY1
    )
    upload_url = up.json()["data"]["download_url"]
    assert httpx.get(upload_url).status_code == 200

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gone = httpx.get(f"{srv.url}/api/v3/predictions/{old}/result", headers=KEY1).status_code == 404
        if gone and httpx.get(upload_url).status_code == 404:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"retention did not run:\n{srv.log()}")
    assert not (files / "inputs" / old).exists()
    # The queued job is older than the retention too, but unfinished: untouched, inputs included.
    r = httpx.get(f"{srv.url}/api/v3/predictions/{queued}/result", headers=KEY1)
    assert r.status_code == 200 and r.json()["data"]["status"] == "created"
    assert any((files / "inputs" / queued).iterdir())
    assert "retention sweep" in srv.log()
