"""Model folders from the Hugging Face Hub: what the pipeline needs of a repository, verify (against
the Hub's metadata when online, else the manifest written at download), list. The download itself,
and its failures, are ``weights/download.py``.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from pipelines.registry import VARIANTS
from weights.manifest import (
    ALLOW_PATTERNS,
    IGNORE_PATTERNS,
    MANIFEST_NAME,
    FileEntry,
    VerifyReport,
    verify_folder,
)

DEFAULT_DIR = Path("weights")


def default_folder(repo_id: str, weights_dir: Path = DEFAULT_DIR) -> Path:
    return weights_dir / repo_id.split("/")[-1]


def resolve_repo(name: str) -> str:
    """A variant name (``edit-plus``) or a Hub id (``Qwen/Qwen-Image-Edit-2509``) to a Hub id."""
    return VARIANTS[name].hub_repo if name in VARIANTS else name


def wanted(name: str) -> bool:
    def match(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    return match(ALLOW_PATTERNS) and not match(IGNORE_PATTERNS)


def hub_listing(
    repo_id: str, revision: str | None = None, endpoint: str | None = None
) -> tuple[str, dict[str, FileEntry]]:
    """The commit ``revision`` names, and the files the pipeline needs from it with their sizes and
    (for LFS files) sha256, from the Hub (``endpoint``: default huggingface_hub's own, ``HF_ENDPOINT``)."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
    out: dict[str, FileEntry] = {}
    for sibling in info.siblings or []:
        if not wanted(sibling.rfilename):
            continue
        sha = sibling.lfs.sha256 if sibling.lfs else None
        out[sibling.rfilename] = FileEntry(size=int(sibling.size or 0), sha256=sha)
    return info.sha or revision or "main", out


def hub_expected(repo_id: str, revision: str | None = None, endpoint: str | None = None) -> dict[str, FileEntry]:
    """Files the pipeline needs from ``repo_id``, with sizes and (for LFS files) sha256, from the Hub."""
    return hub_listing(repo_id, revision, endpoint)[1]


def verify(folder: Path, repo_id: str | None = None, *, online: bool = False, hashes: bool = True) -> VerifyReport:
    """Online with a repo: against the Hub's list. Otherwise: the manifest (or the structure)."""
    expected = hub_expected(repo_id) if online and repo_id else None
    return verify_folder(folder, expected, hashes=hashes)


def list_folders(weights_dir: Path = DEFAULT_DIR) -> list[str]:
    """One line per model folder under ``weights_dir``: name, pipeline class, size, manifest."""
    lines: list[str] = []
    if not weights_dir.is_dir():
        return lines
    for sub in sorted(p for p in weights_dir.iterdir() if p.is_dir()):
        index = sub / "model_index.json"
        if not index.is_file():
            continue
        cls = json.loads(index.read_text()).get("_class_name", "?")
        size = sum(p.stat().st_size for p in sub.rglob("*") if p.is_file())
        manifest = "manifest" if (sub / MANIFEST_NAME).is_file() else "no manifest"
        lines.append(f"{sub.name}\t{cls}\t{size / 1e9:.2f} GB\t{manifest}")
    return lines
