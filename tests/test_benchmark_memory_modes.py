"""benchmarks/memory_modes.py runs end to end on the tiny model (so the GPU benchmark cannot rot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.memory_modes import main


@pytest.mark.e2e  # a whole benchmark run, every memory mode
def test_memory_modes_benchmark_runs_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "table.md"
    modes = "full,group-block,group-leaf,text-encoder-offload,model-offload"
    # In this process (diffusers is imported already): the script's main, as `python -m` runs it.
    assert main(["--tiny", "--steps", "1", "--modes", modes, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == modes.split(",")
    for row in rows[:4]:
        assert row["seconds_per_step"] is not None and row["estimated_peak_gb"] > 0
    assert rows[4]["note"] == "skipped: needs a GPU"
    table = out.read_text()
    assert table.startswith("GPU: none (CPU)") and "| group-leaf | none |" in table
