"""benchmarks/memory_modes.py runs end to end on the tiny model (so the GPU benchmark cannot rot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_memory_modes_benchmark_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    modes = "full,group-block,group-leaf,text-encoder-offload,model-offload"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.memory_modes",
            "--tiny",
            "--steps",
            "1",
            "--modes",
            modes,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == modes.split(",")
    for row in rows[:4]:
        assert row["seconds_per_step"] is not None and row["estimated_peak_gb"] > 0
    assert rows[4]["note"] == "skipped: needs a GPU"
    table = out.read_text()
    assert table.startswith("GPU: none (CPU)") and "| group-leaf | none |" in table
