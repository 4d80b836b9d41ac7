"""benchmarks/duty.py in its quick mode: a real worker with overlap off and on, every output format,
the stand-in pipeline (the tiny model's run, `--tiny`, costs minutes of CPU: benchmarks/RESULTS.md).
Duty is measured, never asserted: the checks are that every job ran and each figure is a share of
the wall time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import duty


def _rows(out: Path) -> list[dict[str, float]]:
    data = json.loads((out / "duty" / "duty.json").read_text())
    rows: list[dict[str, float]] = data["rows"]
    return rows


def _check(rows: list[dict[str, float]]) -> None:
    for row in rows:
        for mode in ("off", "on"):
            assert 0 < row[f"duty_{mode}"] <= 1 + 1e-9, row
            assert row[f"images_s_{mode}"] > 0 and math.isfinite(row[f"images_s_{mode}"]), row
        assert row["images_s_ratio"] == row["images_s_on"] / row["images_s_off"]


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_duty_quick_every_format(tmp_path: Path) -> None:
    assert duty.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert [(r["size"], r["format"]) for r in rows] == [(256, "jpeg"), (256, "png"), (256, "webp")]
    _check(rows)
    assert (tmp_path / "duty" / "duty.csv").is_file()
