"""server/supervisor.py's per-slot worker environment, and Settings.for_slot for stand-alone workers:
one GPU per worker (CUDA_VISIBLE_DEVICES) and one variant per slot, whichever way a worker starts."""

from __future__ import annotations

from server.settings import Settings
from server.supervisor import worker_env


def test_one_gpu_per_worker_slot() -> None:
    settings = Settings(embedded_workers=4)
    assert [worker_env(settings, slot, {})["CUDA_VISIBLE_DEVICES"] for slot in range(4)] == ["0", "1", "2", "3"]
    # A listed set of GPUs is shared out in order, wrapping when there are more workers than GPUs.
    listed = {"CUDA_VISIBLE_DEVICES": "2, 5,7"}
    assert [worker_env(settings, slot, listed)["CUDA_VISIBLE_DEVICES"] for slot in range(4)] == ["2", "5", "7", "2"]
    # One worker keeps whatever the machine gives it.
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(Settings(embedded_workers=1), 0, {})
    assert worker_env(Settings(embedded_workers=1), 0, {"CUDA_VISIBLE_DEVICES": "3"})["CUDA_VISIBLE_DEVICES"] == "3"


def test_each_slot_gets_its_variant_and_model() -> None:
    settings = Settings(
        embedded_workers=3,
        variants=["edit-2511", "edit-plus"],
        models={"edit-2511": "/models/2511", "edit-plus": "/models/plus"},
        model="/models/edit",
    )
    envs = [worker_env(settings, slot, {"QWEN_EDIT_MODEL": "/models/edit"}) for slot in range(3)]
    assert [(e["QWEN_EDIT_VARIANT"], e["QWEN_EDIT_MODEL"]) for e in envs] == [
        ("edit-2511", "/models/2511"),
        ("edit-plus", "/models/plus"),
        ("edit-2511", "/models/2511"),
    ]
    # A variant with no model configured falls back to the default source (no inherited model).
    bare = Settings(embedded_workers=2, variants=["edit", "edit-plus"], model="/models/edit")
    assert "QWEN_EDIT_MODEL" not in worker_env(bare, 1, {"QWEN_EDIT_MODEL": "/models/edit"})
    assert worker_env(bare, 0, {})["QWEN_EDIT_MODEL"] == "/models/edit"


def test_stand_alone_worker_takes_its_variant_by_slot() -> None:
    settings = Settings(variants=["edit", "edit-plus"], models={"edit-plus": "/models/plus"}, model="/models/edit")
    assert (settings.for_slot(0).variant, settings.for_slot(0).model) == ("edit", "/models/edit")
    assert (settings.for_slot(1).variant, settings.for_slot(1).model) == ("edit-plus", "/models/plus")
    assert settings.for_slot(3).variant == "edit-plus"
    plain = Settings(variant="edit-2511")
    assert plain.for_slot(5) is plain  # no variants list: the worker serves `variant`
