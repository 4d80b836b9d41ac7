"""The safety checker (server/worker/safety.py): verdicts, blur and refusal on a stand-in classifier;
then the tiny random classifier (weights/tiny_safety.py, pinned verdicts) loaded by a real worker
in process, its verdicts reaching ``has_nsfw_contents``; without the setting every flag stays false."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops

from server.settings import Settings
from server.worker.safety import SafetyChecker, SafetyRefused
from tests.support import KEY1, MODEL_URL, data_uri, png_bytes, wait_for

IMAGE = data_uri(png_bytes())


def stand_in(scores: list[float]) -> Any:
    """A classifier that gives image i the nsfw score ``scores[i]``."""
    return lambda images: [[{"label": "NSFW", "score": s}, {"label": "normal", "score": 1 - s}] for s in scores]


def checkerboard() -> Image.Image:
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    for x in range(0, 64, 8):
        for y in range(0, 64, 8):
            if (x + y) // 8 % 2:
                image.paste((255, 255, 255), (x, y, x + 8, y + 8))
    return image


@pytest.mark.parametrize("action", ["flag", "blur"])
def test_verdicts_from_the_unsafe_labels_score(action: str) -> None:
    checker = SafetyChecker(stand_in([0.9, 0.2]), ["nsfw"], threshold=0.5, action=action)
    images = [checkerboard(), checkerboard()]
    checked = checker.check(images)
    assert checked.flags == [True, False]
    changed = [ImageChops.difference(a, b).getbbox() is not None for a, b in zip(images, checked.images, strict=True)]
    assert changed == ([True, False] if action == "blur" else [False, False])


def test_refuse_fails_on_any_flagged_output() -> None:
    checker = SafetyChecker(stand_in([0.1, 0.6]), ["nsfw"], threshold=0.5, action="refuse")
    with pytest.raises(SafetyRefused, match="flagged by the safety checker"):
        checker.check([checkerboard(), checkerboard()])
    assert SafetyChecker(stand_in([0.1]), ["nsfw"], 0.5, "refuse").check([checkerboard()]).flags == [False]


def test_no_setting_no_checker() -> None:
    assert SafetyChecker.load(Settings()) is None


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny classifiers built (and checked) offline by `qwen-edit weights tiny-safety`'s function."""
    from server.cli import main

    root = tmp_path_factory.mktemp("safety")
    for verdict in ("nsfw", "normal"):
        assert main(["weights", "tiny-safety", str(root / verdict), "--verdict", verdict]) == 0
    return {verdict: root / verdict for verdict in ("nsfw", "normal")}


def test_a_model_without_unsafe_labels_is_refused_at_load(classifiers: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="no label among"):
        SafetyChecker.load(Settings(safety_model=str(classifiers["nsfw"]), safety_labels=["porn"], device="cpu"))


def edited(client: Any) -> dict[str, Any]:
    r = client.post(MODEL_URL, json={"prompt": "an edit", "image": IMAGE, "size": "256*256"}, headers=KEY1)
    assert r.status_code == 200, r.text
    pid = r.json()["data"]["id"]

    def done() -> Any:
        data = client.get(f"/api/v3/predictions/{pid}/result", headers=KEY1).json()["data"]
        return data if data["status"] in ("completed", "failed") else None

    result: dict[str, Any] = wait_for(done, 60, pid)
    return result


@pytest.mark.parametrize(
    ("verdict", "action", "status", "flags"),
    [("nsfw", "flag", "completed", [True]), ("normal", "flag", "completed", [False]), ("nsfw", "refuse", "failed", [])],
)
def test_the_worker_reports_the_classifiers_verdicts(
    classifiers: dict[str, Path], tmp_path: Path, verdict: str, action: str, status: str, flags: list[bool]
) -> None:
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from tests.support import FakeRunner, ThreadWorker, settings_for

    settings = settings_for(
        tmp_path / "data", safety_model=str(classifiers[verdict]), safety_action=action, device="cpu"
    )
    with TestClient(create_app(settings)) as client:
        worker = ThreadWorker(settings, FakeRunner()).start()
        try:
            data = edited(client)
        finally:
            worker.stop()
    assert data["status"] == status, data
    assert data["has_nsfw_contents"] == flags
    if status == "failed":
        assert "safety checker" in data["error"] and data["outputs"] == []


def test_without_a_checker_flags_stay_false(stack: Any) -> None:
    data = edited(stack)
    assert data["status"] == "completed" and data["has_nsfw_contents"] == [False]


def test_a_checker_that_cannot_load_fails_the_workers_start(
    classifiers: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded beside the model: a checker asked for and not loadable is the worker's load failure."""
    from pipelines.loader import ModelLoadError
    from server.jobs.contract import WorkerState
    from server.jobs.store import JobStore
    from server.worker import main
    from tests.support import FakeRunner, settings_for

    monkeypatch.setattr(main, "load_runner", lambda settings, variant, worker, group=None: (FakeRunner(), False))
    settings = settings_for(tmp_path / "data", safety_model=str(classifiers["nsfw"]), safety_labels=["porn"])
    store = JobStore.open(settings)
    store.migrate()
    try:
        with pytest.raises(ModelLoadError, match="no label among"):
            main.run_worker(settings, "test/0")
        (worker,) = store.workers.list()
        assert worker.state == WorkerState.FAILED and "no label among" in worker.detail
    finally:
        store.close()
