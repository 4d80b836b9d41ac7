"""Shared output of the benchmarks: percentiles, a printed table, JSON, CSV and PNG files.

Every JSON file is strict JSON (``JSON.parse`` in a browser or Node reads it): a value that is not
a number (a percentile of no completed job, a ratio of nothing) is written as ``null``. The numbers
are written before any plot, and a plot that cannot be drawn is a warning on the console, never a
lost run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    arr = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(arr.mean())}


def square_side(text: str) -> int:
    """An argparse type for the benchmarks that run square outputs: ``256`` or ``256*256`` (the
    ``W*H`` spelling the API and ``qwen-edit bench --size`` use), both meaning 256 pixels a side."""
    parts = text.lower().replace("x", "*").split("*")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a side (256) or a square W*H (256*256)") from None
    if len(sides) not in (1, 2) or len(set(sides)) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: this benchmark runs square outputs (256 or 256*256)")
    if sides[0] < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: a side is at least 16 pixels")
    return sides[0]


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], console: Console | None = None
) -> str:
    """Print a table and return it as Markdown (for RESULTS.md and the README)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col != columns[0] else "left")
    cells = [[_fmt(v) for v in row] for row in rows]
    for row in cells:
        table.add_row(*row)
    (console or Console(width=200)).print(table)
    lines = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    lines += [f"| {' | '.join(row)} |" for row in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    # Not applicable to this row: a direct call has no end-to-end latency, a CPU no GPU memory.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def strict(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None`` (JSON has no word for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def dumps(data: Any, **kwargs: Any) -> str:
    """Strict JSON text: non-finite numbers become ``null``; anything else unknown is its ``str``."""
    return json.dumps(strict(data), allow_nan=False, default=str, **kwargs)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(data, indent=2) + "\n")


def try_plot(path: Path, draw: Callable[[Path], None]) -> bool:
    """Draw a plot with ``draw(path)`` if matplotlib is installed; otherwise say how to get it.
    Called after the JSON and CSV files are written, so a missing plot never costs the numbers."""
    try:
        import matplotlib
    except ImportError:
        print(
            f"note: {path.name} not drawn: matplotlib is not installed "
            "(it is a core dependency: .venv/bin/pip install matplotlib, or the README's first command again); "
            "the JSON and CSV files are complete",
            file=sys.stderr,
        )
        return False
    matplotlib.use("Agg")
    draw(path)
    return True


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
