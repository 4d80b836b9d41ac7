"""benchmarks/report.py and the client's console: strict JSON (NaN and infinities are null), a plot
that needs matplotlib is skipped with a note (the numbers are written first), and failed requests
say why on the console."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks.client.metrics import Goodput, Record, summarize
from benchmarks.client.report import table
from benchmarks.client.schedule import Load
from benchmarks.report import percentiles, square_side, try_plot, write_json


def test_json_files_are_strict(tmp_path: Path) -> None:
    path = tmp_path / "client.json"
    write_json(path, {"e2e_ms": percentiles([]), "ratio": float("inf"), "rows": [{"x": float("-inf"), "y": 1.5}]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert data == {
        "e2e_ms": {"p50": None, "p90": None, "p99": None, "mean": None},
        "ratio": None,
        "rows": [{"x": None, "y": 1.5}],
    }


def test_a_plot_without_matplotlib_is_a_note_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as after the README's first command
    drawn: list[Path] = []
    assert try_plot(tmp_path / "client.png", drawn.append) is False
    assert drawn == []
    err = capsys.readouterr().err
    assert "client.png not drawn: matplotlib is not installed" in err and "pip install matplotlib" in err


def test_failed_requests_say_why_on_the_console(capsys: pytest.CaptureFixture[str]) -> None:
    records = [
        Record("local", "C=1", 0, "x", ok=True, e2el_ms=10.0, inference_ms=5.0),
        Record("local", "C=1", 1, "x", code="http 429", error="queue full"),
        Record("local", "C=1", 2, "x", code="http 429", error="queue full"),
        Record("local", "C=1", 3, "x", code="1403", error="Cancelled by the client while running."),
    ]
    summary = summarize(records, 1.0, Load(None, 1), [50, 99], Goodput())
    run = {"name": "t", "backend": "v3", "model_id": "m", "interrupted": False, "percentiles": [50, 99]}
    table({**run, "goodput": {}, "capacity": {}, "results": [{"label": "local", **summary}]})
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "local C=1: failed x2: http 429 queue full",
        "local C=1: failed x1: 1403 Cancelled by the client while running.",
    ]
    assert summary["errors"] == {"http 429": 2, "1403": 1} and summary["completed"] == 1


@pytest.mark.parametrize("text, side", [("256", 256), ("256*256", 256), ("512x512", 512)])
def test_square_benchmarks_take_a_side_or_the_api_s_w_h(text: str, side: int) -> None:
    assert square_side(text) == side


@pytest.mark.parametrize("text", ["256*128", "big", "8", "1*2*3"])
def test_a_size_a_square_benchmark_cannot_run_is_refused_clearly(text: str) -> None:
    import argparse
    import re

    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
        square_side(text)
