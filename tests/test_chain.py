"""Chained edits: an output of this server is an input of the next edit, read from storage (never
fetched back over HTTP), for its own prediction's owner; anything else of ours that is not there,
or not theirs, is a 400 naming it. In process, with a worker loop in a thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.jobs.store import JobStore
from tests.support import KEY1, KEY2, MODEL_URL, FakeRunner, ThreadWorker, data_uri, png_bytes, settings_for, wait_for

PLUS_URL = "/api/v3/wavespeed-ai/qwen-image/edit-plus"


def finished(client: Any, pid: str, headers: dict[str, str] = KEY1) -> dict[str, Any]:
    def done() -> Any:
        data = client.get(f"/api/v3/predictions/{pid}/result", headers=headers).json()["data"]
        return data if data["status"] in ("completed", "failed") else None

    return wait_for(done, 30, pid)  # type: ignore[no-any-return]


def edit(client: Any, image: str, url: str = MODEL_URL, headers: dict[str, str] = KEY1, **extra: Any) -> Any:
    field = {"images": image} if url == PLUS_URL else {"image": image}
    return client.post(url, json={"prompt": "again", "size": "256*256", **field, **extra}, headers=headers)


def test_three_edits_chained_on_outputs_read_from_storage(stack: Any, app_settings: Any) -> None:
    image = data_uri(png_bytes())
    ids = []
    for _ in range(3):
        r = edit(stack, image)
        assert r.status_code == 200, r.text
        ids.append(r.json()["data"]["id"])
        done = finished(stack, ids[-1])
        assert done["status"] == "completed", done
        image = done["outputs"][0]
    store = JobStore.open(app_settings)
    try:
        refs = [store.get(pid).params.images[0] for pid in ids]  # type: ignore[union-attr]
    finally:
        store.close()
    # The second and third edits took the earlier outputs by storage key, not by URL.
    assert refs[0].key is not None and refs[0].key.startswith("inputs/")
    for ref, previous in zip(refs[1:], ids, strict=False):
        assert ref.url is None and ref.key is not None and ref.key.startswith(f"outputs/{previous}/")


def test_an_upload_and_an_output_in_sync_mode(stack: Any) -> None:
    up = stack.post("/api/v3/media/upload/binary", files={"file": ("a.png", png_bytes())}, headers=KEY1).json()
    first = edit(stack, up["data"]["download_url"], enable_sync_mode=True).json()["data"]
    second = edit(stack, first["outputs"][0], enable_sync_mode=True).json()["data"]
    assert first["status"] == second["status"] == "completed"


@pytest.fixture
def family(tmp_path: Path) -> Any:
    """Edit and Edit-Plus served, a worker loop for each."""
    settings = settings_for(tmp_path / "data", embedded_workers=0, variants=["edit", "edit-plus"])
    with TestClient(create_app(settings)) as client:
        workers = [ThreadWorker(settings.for_slot(slot), FakeRunner(), f"test/{slot}").start() for slot in (0, 1)]
        try:
            yield client
        finally:
            for worker in workers:
                worker.stop()


def test_edit_plus_takes_an_earlier_output_among_its_images(family: Any) -> None:
    out = finished(family, edit(family, data_uri(png_bytes())).json()["data"]["id"])["outputs"][0]
    r = edit(family, [data_uri(png_bytes(color=(1, 200, 1))), out], url=PLUS_URL)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    assert finished(family, r.json()["data"]["id"])["status"] == "completed"


def test_our_urls_that_point_at_nothing_or_not_at_yours_are_400(stack: Any) -> None:
    done = finished(stack, edit(stack, data_uri(png_bytes())).json()["data"]["id"])
    output = done["outputs"][0]
    job_id = done["id"]
    base = "http://testserver/files/"
    unusable = [
        base + f"outputs/{job_id}/9-ffffffffffff.jpeg",  # a name under a real job that it never had
        base + "outputs/00000000000000000000000000000000/0-abc.jpeg",
        base + "uploads/nothing/here.png",
        base + "inputs/" + job_id + "/0.png",  # stored copies of inputs are nobody's to reuse
        base + "jobs.db",
        base + "outputs/" + "x" * 3000,
    ]
    for url in unusable:
        r = edit(stack, url)
        assert r.status_code == 400, (url, r.text)
        assert r.json()["message"] == f"image refers to a file that does not exist on this server: {url}"
    # Another key's output: the same answer (predictions are private to their key).
    r = edit(stack, output, headers=KEY2)
    assert r.status_code == 400 and "does not exist on this server" in r.json()["message"]


def test_outputs_under_each_public_host_are_ours(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "data", public_urls=["https://edits.example.com"])
    with TestClient(create_app(settings)) as client:
        worker = ThreadWorker(settings, FakeRunner()).start()
        try:
            out = finished(client, edit(client, data_uri(png_bytes())).json()["data"]["id"])["outputs"][0]
            other_host = out.replace("http://testserver", "https://edits.example.com")
            r = edit(client, other_host)
            assert r.status_code == 200, r.text
            assert finished(client, r.json()["data"]["id"])["status"] == "completed"
        finally:
            worker.stop()
