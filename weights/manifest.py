"""What a model folder should hold, and whether it does.

A manifest (``.qwen-edit-manifest.json`` in the folder) lists every file with its size and sha256.
``qwen-edit weights download`` writes it from the Hub's metadata (LFS files carry their sha256),
hashing the small files locally, so ``verify`` works offline afterwards. Without a manifest,
verify still checks the structure: every component in ``model_index.json`` has its config, and
every shard named by a ``*.safetensors.index.json`` exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = ".qwen-edit-manifest.json"

# What the pipeline needs from a Hub repository: nothing else is downloaded.
ALLOW_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*/generation_config.json",
    "tokenizer/*",
    "processor/*",
    "scheduler/scheduler_config.json",
]
# Tokenizer and processor folders may also carry non-pipeline files; these never matter.
IGNORE_PATTERNS = ["*.md", "*.bin", "*.pt", "*.ckpt", "*.onnx", "*.msgpack", "*.h5"]


@dataclass
class FileEntry:
    size: int
    sha256: str | None = None


@dataclass
class VerifyReport:
    folder: Path
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    wrong_size: list[tuple[str, int, int]] = field(default_factory=list)  # (file, expected, actual)
    wrong_hash: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # structural
    note: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.wrong_size or self.wrong_hash or self.problems)

    def text(self) -> str:
        note = f" [{self.note}]" if self.note else ""
        if self.ok:
            return f"{self.folder}: OK ({self.checked} files checked){note}"
        lines = [f"{self.folder}: NOT OK{note}"]
        lines += [f"  missing: {name}" for name in self.missing]
        lines += [
            f"  corrupt (size {actual} bytes, expected {expected}): {name}"
            for name, expected, actual in self.wrong_size
        ]
        lines += [f"  corrupt (sha256 differs): {name}" for name in self.wrong_hash]
        lines += [f"  {problem}" for problem in self.problems]
        lines.append("  Re-run `qwen-edit weights download` to fetch what is missing (it resumes).")
        return "\n".join(lines)


def sha256_of(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def local_files(folder: Path) -> list[str]:
    """Relative paths of the folder's files, skipping hidden files and folders (caches, the manifest)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(rel.as_posix())
    return out


def build_manifest(folder: Path, known: dict[str, FileEntry] | None = None, source: str = "") -> dict[str, Any]:
    """A manifest of ``folder``: ``known`` entries (from the Hub) where given, else measured here."""
    files: dict[str, dict[str, Any]] = {}
    for name in local_files(folder):
        entry = (known or {}).get(name)
        if entry is None or entry.sha256 is None:
            path = folder / name
            entry = FileEntry(size=path.stat().st_size, sha256=sha256_of(path))
        files[name] = {"size": entry.size, "sha256": entry.sha256}
    # Files the Hub lists that are not here yet still belong in the manifest: verify reports them.
    for name, entry in (known or {}).items():
        files.setdefault(name, {"size": entry.size, "sha256": entry.sha256})
    return {"source": source, "files": dict(sorted(files.items()))}


def write_manifest(folder: Path, known: dict[str, FileEntry] | None = None, source: str = "") -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(build_manifest(folder, known, source), indent=1, allow_nan=False) + "\n")
    return path


def read_manifest(folder: Path) -> dict[str, FileEntry] | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    files = json.loads(path.read_text())["files"]
    return {name: FileEntry(size=int(v["size"]), sha256=v.get("sha256")) for name, v in files.items()}


def check_structure(folder: Path, report: VerifyReport) -> None:
    """What ``from_pretrained`` will need, read from the folder's own index files."""
    index = folder / "model_index.json"
    if not index.is_file():
        report.missing.append("model_index.json")
        return
    for component, spec in json.loads(index.read_text()).items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / component
        if not sub.is_dir():
            report.missing.append(f"{component}/")
            continue
        if component in ("transformer", "vae", "text_encoder"):
            if not (sub / "config.json").is_file():
                report.missing.append(f"{component}/config.json")
            shards = list(sub.glob("*.safetensors"))
            indexes = list(sub.glob("*.safetensors.index.json"))
            if not shards:
                report.missing.append(f"{component}/*.safetensors")
            for shard_index in indexes:
                for shard in sorted(set(json.loads(shard_index.read_text())["weight_map"].values())):
                    if not (sub / shard).is_file():
                        report.missing.append(f"{component}/{shard}")


def verify_folder(folder: Path, expected: dict[str, FileEntry] | None = None, *, hashes: bool = True) -> VerifyReport:
    """Check ``folder`` against ``expected`` (else its manifest, else its structure alone)."""
    report = VerifyReport(folder=folder)
    if not folder.is_dir():
        report.problems.append("the folder does not exist")
        return report
    expected = expected if expected is not None else read_manifest(folder)
    if expected is None:
        report.note = f"no {MANIFEST_NAME}: checked the structure only (no sizes or hashes)"
        check_structure(folder, report)
        report.checked = len(local_files(folder))
        return report
    for name, entry in expected.items():
        path = folder / name
        if not path.is_file():
            report.missing.append(name)
            continue
        report.checked += 1
        size = path.stat().st_size
        if size != entry.size:
            report.wrong_size.append((name, entry.size, size))
        elif hashes and entry.sha256 and sha256_of(path) != entry.sha256:
            report.wrong_hash.append(name)
    return report
