"""``qwen-edit bench compare RUN ...``: runs side by side, each against the first.

RUN is a result file (``NAME.json``) or a folder of them. Each row is one endpoint at one load of
one run; its baseline is the first run's row at the same load (else the first run's first row).
The median e2el ratio comes with a bootstrap 95 % interval (both samples resampled, 2,000 times):
"faster" or "slower" only when the whole interval is on one side of 1, "same" otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import print_table

RESAMPLES = 2000


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for path in paths:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{file}: not a result file ({exc})") from None
            if isinstance(data, dict) and "results" in data and "e2els_ms" in (data["results"] or [{}])[0]:
                runs.append(data)
            elif not path.is_dir():
                raise ValueError(f"{file}: not a result of qwen-edit bench")
    if not runs:
        raise ValueError("no result files found")
    return runs


def median_ratio_ci(sample: list[float], base: list[float], seed: int = 0) -> tuple[float, float, float]:
    """median(sample) / median(base), and the bootstrap 95 % interval of that ratio."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(sample, dtype=float), np.asarray(base, dtype=float)
    ra = np.median(rng.choice(a, (RESAMPLES, len(a))), axis=1)
    rb = np.median(rng.choice(b, (RESAMPLES, len(b))), axis=1)
    low, high = np.percentile(ra / rb, [2.5, 97.5])
    return float(np.median(a) / np.median(b)), float(low), float(high)


def median_ci(sample: list[float], seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(np.asarray(sample, dtype=float), (RESAMPLES, len(sample))), axis=1)
    low, high = np.percentile(meds, [2.5, 97.5])
    return float(low), float(high)


def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first = runs[0]["results"]
    out = []
    for run in runs:
        for r in run["results"]:
            base = next((b for b in first if b["load"] == r["load"]), first[0])
            row: dict[str, Any] = {
                "run": run["name"],
                "date": run["date"],
                "endpoint": r["label"],
                "load": r["load"],
                "completed": r["completed"],
                "failed": r["failed"],
                "request_throughput": r["request_throughput"],
                "median_e2el_ms": r["median_e2el_ms"],
                "p99_e2el_ms": r.get("p99_e2el_ms"),
                "median_ci_ms": None,
                "ratio": None,
                "ratio_ci": None,
                "verdict": "-",
            }
            if r["e2els_ms"]:
                row["median_ci_ms"] = median_ci(r["e2els_ms"])
            if r["e2els_ms"] and base["e2els_ms"] and r is not base:
                ratio, low, high = median_ratio_ci(r["e2els_ms"], base["e2els_ms"])
                verdict = "faster" if high < 1 else "slower" if low > 1 else "same (within noise)"
                row.update(ratio=ratio, ratio_ci=(low, high), verdict=verdict)
            elif r is base:
                row.update(ratio=1.0, verdict="baseline")
            out.append(row)
    return out


def _ci(pair: tuple[float, float] | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    return "-" if pair is None else f"{fmt.format(pair[0] * scale)}-{fmt.format(pair[1] * scale)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwen-edit bench compare", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="result files (NAME.json) or folders of them")
    p.add_argument("--out", type=Path, help="also write the table as Markdown to this file")
    args = p.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except ValueError as exc:
        print(f"qwen-edit bench compare: error: {exc}", file=sys.stderr)
        return 2
    table = rows(runs)
    columns = [
        "run",
        "endpoint",
        "load",
        "ok",
        "failed",
        "req/s",
        "e2el p50 ms",
        "p50 95% CI ms",
        "e2el p99 ms",
        "p50 ratio",
        "ratio 95% CI",
        "verdict",
    ]
    cells = [
        [
            r["run"],
            r["endpoint"],
            r["load"],
            r["completed"],
            r["failed"],
            r["request_throughput"],
            r["median_e2el_ms"],
            _ci(r["median_ci_ms"]),
            r["p99_e2el_ms"],
            r["ratio"],
            _ci(r["ratio_ci"], fmt="{:.3f}"),
            r["verdict"],
        ]
        for r in table
    ]
    markdown = print_table("compared with the first run", columns, cells)
    if args.out:
        args.out.write_text(markdown + "\n")
    return 0
