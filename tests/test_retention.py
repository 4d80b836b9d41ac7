"""Retention: old finished jobs, their files and stale uploads go; queued jobs and their inputs stay."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import KEY1, MODEL_URL, data_uri, png_bytes, settings_for, wait_for


@pytest.fixture
def short_retention(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    from fastapi.testclient import TestClient

    from server.api.app import create_app

    # No worker: queued jobs stay queued, however old.
    settings = settings_for(tmp_path / "data", retention_s=2, retention_interval_s=0.5)
    with TestClient(create_app(settings)) as client:
        yield client, settings.resolved_storage_dir


def test_retention_deletes_old_jobs_and_files_only(short_retention: tuple[Any, Path]) -> None:
    client, files = short_retention

    def submit() -> str:
        r = client.post(MODEL_URL, json={"prompt": "x", "image": data_uri(png_bytes())}, headers=KEY1)
        assert r.status_code == 200, r.text
        return str(r.json()["data"]["id"])

    old, queued = submit(), submit()

    def inputs_of(job_id: str) -> list[Path]:  # inputs/<2 hex>/<job id>-<index>-<random>.<ext>
        return list((files / "inputs").glob(f"{job_id[:2]}/{job_id}-*"))

    assert inputs_of(old) and inputs_of(queued)
    cancel = client.post(f"/api/v3/predictions/{old}/cancel", headers=KEY1)
    assert cancel.json()["data"].get("status") == "failed", cancel.text  # finished: subject to retention
    up = client.post("/api/v3/media/upload/binary", files={"file": ("a.png", png_bytes(), "image/png")}, headers=KEY1)
    upload_url = up.json()["data"]["download_url"]
    assert client.get(upload_url).status_code == 200

    def swept() -> bool:
        gone = client.get(f"/api/v3/predictions/{old}/result", headers=KEY1).status_code == 404
        return gone and client.get(upload_url).status_code == 404

    wait_for(swept, timeout=30, what="the retention sweep")
    assert not inputs_of(old)
    # The queued job is older than the retention too, but unfinished: untouched, inputs included.
    r = client.get(f"/api/v3/predictions/{queued}/result", headers=KEY1)
    assert r.status_code == 200 and r.json()["data"]["status"] == "created"
    assert inputs_of(queued)
