"""weights/: verify catches missing and truncated files; offline loading of an uncached Hub id is a clear error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.loader import ModelLoadError, check_model_folder, resolve_source
from pipelines.registry import get_variant
from tests.support import ROOT
from weights.hub import list_folders, wanted
from weights.manifest import MANIFEST_NAME, read_manifest, verify_folder, write_manifest


@pytest.fixture
def model_copy(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "weights" / "Qwen-Image-Edit"
    shutil.copytree(tiny_models["edit"], folder)
    write_manifest(folder, source="tiny")
    return folder


def test_manifest_lists_every_file_with_size_and_hash(model_copy: Path) -> None:
    manifest = read_manifest(model_copy)
    assert manifest is not None
    assert "transformer/diffusion_pytorch_model.safetensors" in manifest
    assert all(e.sha256 and len(e.sha256) == 64 for e in manifest.values())
    assert MANIFEST_NAME not in manifest
    assert verify_folder(model_copy).ok


def test_verify_catches_truncated_and_missing_files(model_copy: Path) -> None:
    weights = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    full = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(full // 2)
    (model_copy / "vae" / "config.json").unlink()
    report = verify_folder(model_copy)
    assert not report.ok
    assert report.missing == ["vae/config.json"]
    assert report.wrong_size == [("transformer/diffusion_pytorch_model.safetensors", full, full // 2)]
    text = report.text()
    assert "missing: vae/config.json" in text and "corrupt" in text
    # The CLI says the same and exits 1; loading refuses the folder with the same report.
    cli = subprocess.run(
        [sys.executable, "-m", "server.cli", "weights", "verify", str(model_copy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1 and "missing: vae/config.json" in cli.stdout
    with pytest.raises(ModelLoadError, match="incomplete or corrupt"):
        check_model_folder(str(model_copy), get_variant("edit"))


def test_verify_catches_same_size_corruption_by_hash(model_copy: Path) -> None:
    target = model_copy / "text_encoder" / "config.json"
    data = bytearray(target.read_bytes())
    data[-3] ^= 1
    target.write_bytes(bytes(data))
    report = verify_folder(model_copy)
    assert report.wrong_hash == ["text_encoder/config.json"]
    assert verify_folder(model_copy, hashes=False).ok  # --fast checks sizes only


def test_without_manifest_structure_is_checked(model_copy: Path) -> None:
    (model_copy / MANIFEST_NAME).unlink()
    assert verify_folder(model_copy).ok
    shutil.rmtree(model_copy / "transformer")
    report = verify_folder(model_copy)
    assert "transformer/" in report.missing


def test_list_and_patterns(model_copy: Path) -> None:
    (lines,) = list_folders(model_copy.parent)
    assert lines.startswith("Qwen-Image-Edit\tQwenImageEditPipeline") and lines.endswith("manifest")
    assert wanted("transformer/diffusion_pytorch_model-00001-of-00009.safetensors")
    assert wanted("transformer/diffusion_pytorch_model.safetensors.index.json")
    assert wanted("tokenizer/vocab.json") and wanted("scheduler/scheduler_config.json")
    assert not wanted("README.md") and not wanted("assets/teaser.png")


def test_offline_hub_id_not_cached_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = (
        "from pipelines.loader import resolve_source, ModelLoadError\n"
        "try:\n    resolve_source('Qwen/Qwen-Image-Edit-2511')\n"
        "except ModelLoadError as exc:\n    print('ERR', exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ERR"), out.stderr
    assert "not in the local Hugging Face cache" in out.stdout and "HF_HUB_OFFLINE=1" in out.stdout
    assert "qwen-edit weights download Qwen/Qwen-Image-Edit-2511" in out.stdout
    assert resolve_source(str(tmp_path)) == str(tmp_path)  # a local folder passes through
