"""A run's outputs: the printed table, ``<name>.json`` (vLLM's field names), ``<name>.csv`` (one row
per request) and ``<name>.png`` (latency CDF per endpoint, p50/p99 against load, throughput against
load with the goodput line). The numbers are written first: a figure that cannot be drawn is a
warning, never a lost run."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.client.metrics import Record
from benchmarks.report import print_table, write_csv, write_json


def pct_key(percentiles: list[float]) -> str:
    """The highest requested percentile: the tail the table shows."""
    p = max(percentiles)
    return f"p{int(p)}" if p == int(p) else f"p{p:g}".replace(".", "_")


def table(run: dict[str, Any]) -> str:
    tail = pct_key(run["percentiles"])
    columns = [
        "endpoint",
        "load",
        "ok",
        "failed",
        "req/s",
        "goodput req/s",
        "e2el p50 ms",
        f"e2el {tail} ms",
        "queue p50 ms",
        "inference p50 ms",
        "download p50 ms",
        "polls/req",
    ]
    rows = [
        [
            r["label"],
            r["load"],
            r["completed"],
            r["failed"],
            r["request_throughput"],
            r["request_goodput"],
            r["median_e2el_ms"],
            r[f"{tail}_e2el_ms"],
            r["median_queue_ms"],
            r["median_inference_ms"],
            r["median_download_ms"],
            r["polls_per_request"],
        ]
        for r in run["results"]
    ]
    title = f"{run['name']}: {run['backend']} {run['model_id']}" + (" (INTERRUPTED)" if run["interrupted"] else "")
    markdown = print_table(title, columns, rows)
    lines = [markdown]
    for label, cap in run["capacity"].items():
        if run["goodput"]:
            what = f"sustains {cap['load']} ({cap['request_throughput']:.3g} req/s done)" if cap else "met at no load"
            line = f"{label}: {what} at {_goodput(run)}"
            print(line)
            lines.append(f"\n{line}")
    for r in run["results"]:
        for code, count in r["errors"].items():
            why = r.get("error_examples", {}).get(code, "")
            print(f"{r['label']} {r['load']}: failed x{count}: {code} {why}".rstrip(), file=sys.stderr)
    return "\n".join(lines)


def _goodput(run: dict[str, Any]) -> str:
    return ", ".join(f"{k} <= {v / 1000:g} s" for k, v in run["goodput"].items())


def write_numbers(run: dict[str, Any], records: list[Record], out: Path, name: str) -> None:
    write_json(out / f"{name}.json", run)
    write_csv(out / f"{name}.csv", [asdict(r) for r in records])


def try_plot(run: dict[str, Any], out: Path, name: str) -> bool:
    try:
        plot(out / f"{name}.png", run)
    except Exception as exc:  # the numbers are written; a figure is a convenience
        print(
            f"warning: {name}.png not drawn ({type(exc).__name__}: {exc}); the JSON and CSV are complete",
            file=sys.stderr,
        )
        return False
    return True


def plot(path: Path, run: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in run["results"]))
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    fig, (cdf, lat, thr) = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in run["results"]:
        values = sorted(r["e2els_ms"])
        if values:
            ys = [(i + 1) / len(values) for i in range(len(values))]
            cdf.step([v / 1000 for v in values], ys, where="post", label=f"{r['label']} {r['load']}", alpha=0.8)
    cdf.set(xlabel="end-to-end latency (s)", ylabel="share of requests", title="latency CDF")
    if cdf.lines:
        cdf.legend(fontsize="small")
    tail = pct_key(run["percentiles"])
    xlabel = "request rate (req/s)" if _open(run) else "concurrency"
    for label in labels:
        mine = [r for r in run["results"] if r["label"] == label and _finite(r["load_value"])]
        xs = [r["load_value"] for r in mine]
        c = colours[label]
        lat.plot(xs, [_s(r["median_e2el_ms"]) for r in mine], "o-", color=c, label=f"{label} p50")
        lat.plot(xs, [_s(r[f"{tail}_e2el_ms"]) for r in mine], "s--", color=c, label=f"{label} {tail}")
        thr.plot(xs, [r["request_throughput"] for r in mine], "o-", color=c, label=f"{label} completed")
        if run["goodput"]:
            thr.plot(xs, [r["request_goodput"] for r in mine], "x:", color=c, label=f"{label} goodput")
    if _open(run):
        rates = sorted({r["load_value"] for r in run["results"] if _finite(r["load_value"])})
        thr.plot(rates, rates, color="grey", lw=0.8, label="offered")
    lat.set(xlabel=xlabel, ylabel="end-to-end latency (s)", title=f"latency (p50, {tail}) vs load")
    thr.set(
        xlabel=xlabel, ylabel="requests/s", title="throughput vs load" + (f" ({_goodput(run)})" * bool(run["goodput"]))
    )
    for ax in (lat, thr):
        ax.set_ylim(bottom=0)  # a zoomed axis makes noise look like a difference
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"{run['name']} ({run['date']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _open(run: dict[str, Any]) -> bool:
    return any(r["request_rate"] is not None and _finite(r["request_rate"]) for r in run["results"])


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _s(ms: float | None) -> float:
    return ms / 1000 if ms is not None else math.nan
