"""``qwen-edit weights download`` against a fake Hub (tests/fakehub.py) over real HTTP: the files and
manifest land, an interrupted download resumes with a Range request, and a Hub that cannot be
reached or refuses gives one line, a non-zero exit and no empty folder."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from tests.core_install import core_env
from tests.fakehub import FakeHub
from weights.download import DownloadError, download
from weights.manifest import MANIFEST_NAME, verify_folder

REPO = "org/Tiny-Edit"
SHARD = "transformer/diffusion_pytorch_model.safetensors"


def files() -> dict[str, bytes]:
    return {
        "model_index.json": b'{"_class_name": "QwenImageEditPipeline"}',
        "transformer/config.json": b'{"num_layers": 1}',
        SHARD: bytes(range(256)) * 64,  # 16 KiB
        "README.md": b"# not needed by the pipeline",
    }


def test_download_writes_what_the_pipeline_needs_and_a_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    with FakeHub({REPO: files()}) as hub:
        download(REPO, folder, endpoint=hub.url)
    assert (folder / SHARD).read_bytes() == files()[SHARD]
    assert not (folder / "README.md").exists()  # not in the allow list
    assert (folder / MANIFEST_NAME).is_file()
    report = verify_folder(folder)
    assert report.ok, report.text()


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub keeps what arrived in whole chunks (10 MB); test-sized chunks for a 16 KiB file.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    folder = tmp_path / "model"
    data = files()[SHARD]
    with FakeHub({REPO: files()}) as hub:
        hub.cut = {SHARD}  # half the shard arrives, then the connection drops and the Hub fails
        with pytest.raises(DownloadError) as err:
            download(REPO, folder, endpoint=hub.url)
        message = str(err.value)
        assert "\n" not in message and "run the same command again to resume" in message, message
        assert folder.is_dir()  # the fetched part is kept
        hub.cut = set()
        hub.seen.clear()
        download(REPO, folder, endpoint=hub.url)
    ranges = [s.range for s in hub.seen if s.method == "GET" and s.path.endswith(SHARD)]
    assert ranges == [f"bytes={len(data) // 2}-"], ranges  # only the missing half was asked for
    assert hashlib.sha256((folder / SHARD).read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert verify_folder(folder).ok


def test_a_refused_repository_is_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    folder = tmp_path / "weights" / "Tiny-Edit"
    with FakeHub({REPO: files()}) as hub:
        hub.refuse = 403
        with pytest.raises(DownloadError) as err:
            download(REPO, folder, endpoint=hub.url)
    assert "gated" in str(err.value) and "HF_TOKEN" in str(err.value), err.value
    assert not folder.exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_without_a_reachable_hub_says_why_in_one_line(tmp_path: Path) -> None:
    """The CLI as the README's first command installs it, with huggingface_hub's own HF_ENDPOINT."""
    env = core_env(tmp_path / "core")
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    env["HF_HUB_ETAG_TIMEOUT"] = env["HF_HUB_DOWNLOAD_TIMEOUT"] = "5"
    folder = tmp_path / "weights" / "Qwen-Image-Edit-2511"
    cli = Path(sys.executable).with_name("qwen-edit")
    out = subprocess.run(
        [str(cli), "weights", "download", "edit-2511", "--dir", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("qwen-edit weights download: cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert "Air-gapped" in lines[0]
    assert not folder.exists() and not (tmp_path / "weights").exists()
