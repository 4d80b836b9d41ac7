"""server/storage/local.py: files under one folder, written whole, never outside it."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from server.storage.local import LocalStorage


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "files")


def test_put_then_get_leaves_one_private_file_and_no_temp(storage: LocalStorage) -> None:
    storage.put("outputs/ab/job_0.png", b"one")
    storage.put("outputs/ab/job_0.png", b"two")  # replaced whole
    assert storage.get("outputs/ab/job_0.png") == b"two"
    assert storage.exists("outputs/ab/job_0.png")
    folder = storage.root / "outputs" / "ab"
    assert sorted(os.listdir(folder)) == ["job_0.png"]
    assert stat.S_IMODE((folder / "job_0.png").stat().st_mode) == 0o600
    assert storage.local_path("outputs/ab/job_0.png") == folder / "job_0.png"


def test_a_folder_removed_between_puts_is_made_again(storage: LocalStorage) -> None:
    storage.put("inputs/7f/a.png", b"a")
    shutil.rmtree(storage.root / "inputs")  # the retention sweep emptied and removed it
    storage.put("inputs/7f/b.png", b"b")
    assert storage.get("inputs/7f/b.png") == b"b"


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a\\b", "a\0b", "./a"])
def test_keys_it_could_not_have_made_are_refused(storage: LocalStorage, key: str) -> None:
    with pytest.raises(KeyError):
        storage.put(key, b"x")
    with pytest.raises(FileNotFoundError):
        storage.get(key)
    assert not storage.exists(key)
    assert storage.local_path(key) is None


def test_a_symlink_out_of_the_folder_is_never_followed(storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (storage.root / "outputs").mkdir()
    (storage.root / "outputs" / "link").symlink_to(outside)
    (storage.root / "loop").symlink_to(storage.root / "loop")
    with pytest.raises(KeyError):
        storage.put("outputs/link/new", b"x")
    assert not (outside / "new").exists()
    with pytest.raises(FileNotFoundError):
        storage.get("outputs/link/secret")
    with pytest.raises(FileNotFoundError):
        storage.get("loop/x")
    storage.delete("outputs/link/secret")
    assert (outside / "secret").exists()
