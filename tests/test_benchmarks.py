"""The CPU benchmarks in their short mode, so that they cannot rot: each runs end to end on the
tiny model and writes its table, JSON, CSV and plot. No timing thresholds: numbers are only
checked for sanity (present, positive, consistent)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from benchmarks import batching, contention, gpu, overhead

pytestmark = pytest.mark.e2e

# The latency client (`qwen-edit bench`) has its own tests: tests/test_bench_client.py.


@pytest.mark.timeout(1800)  # a shared 2-core CPU: the tiny model's 1 MP VAE pass is slow
def test_overhead_quick(tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Each benchmark's main runs in this process, as `python -m benchmarks.X` would run it: the
    # direct pipeline calls reuse this process's imports (a fresh one spends ~12 s importing).
    args = ["--quick", "--jobs", "1", "--requests", "60", "--store-jobs", "100"]
    assert overhead.main([*args, "--model", str(tiny_models["edit"]), "--out", str(tmp_path)]) == 0
    assert "ratio (p50)" in capsys.readouterr().out  # the printed tables
    data = json.loads((tmp_path / "overhead.json").read_text())
    paths = [r["path"] for r in data["latency"]]
    assert paths == ["direct (in process)", "HTTP async + polling every 10 ms", "HTTP sync"]
    assert all(r["p50"] > 0 and r["ratio"] > 0 for r in data["latency"])
    assert len(data["direct_ms"]) == 1
    assert [len(data["http_jobs"][p]) for p in ("sync", "async")] == [1, 1]
    # What the server adds, paired per job: end-to-end minus the job's own pipeline call.
    for row in data["added"]:
        job = data["http_jobs"]["async" if "async" in row["path"] else "sync"][0]
        assert row["p50"] == pytest.approx(job["e2el_ms"] - job["inference_ms"])
        assert 0 < row["p50"] < job["e2el_ms"] and job["inference_ms"] > 0
    # Inside the server, from the job rows: every part of both paths, none negative.
    parts = {(r["path"], r["part"]) for r in data["server_breakdown"]}
    assert len(parts) == 6 and all(r["p50"] >= 0 for r in data["server_breakdown"])
    assert [e["requests"] for e in data["endpoints"][:2]] == [60, 60]
    assert all(e["p99"] >= e["p50"] > 0 for e in data["endpoints"])
    assert set(data["goals"]) == {"overhead_ratio", "overhead_ms", "poll_p99_ms", "result_vs_floor", "submit_vs_floor"}
    # The framework floor, in the same run: both endpoints, a fraction of its throughput each.
    assert [r["endpoint"] for r in data["floor"]] == ["POST submit", "GET result"]
    assert all(r["floor_req_s"] > 0 and r["fraction"] > 0 for r in data["floor"])
    assert all(r["pipeline_slowdown"] > 0 for r in data["added"])
    assert "| path |" in (tmp_path / "overhead.md").read_text()
    assert len(list(csv.DictReader((tmp_path / "overhead.csv").open()))) == 6


def test_contention_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m benchmarks.contention --quick`: polls alone and beside big submits, their ratio."""
    assert contention.main(["--quick", "--seconds", "0.5", "--body-mb", "1.5", "--out", str(tmp_path)]) == 0
    assert "p99 ratio" in capsys.readouterr().out
    data = json.loads((tmp_path / "contention.json").read_text())
    assert data["alone"]["p99"] >= data["alone"]["p50"] > 0 and data["beside"]["p99"] >= data["beside"]["p50"] > 0
    assert data["submits"]["p50"] > 0 and data["body_bytes"] > 1_000_000 and data["p99_ratio"] > 0
    assert "| requests |" in (tmp_path / "contention.md").read_text()


@pytest.mark.e2e  # every phase at real widths on the CPU: ~4 minutes
@pytest.mark.timeout(1800)
def test_gpu_truth_table_smoke(tmp_path: Path) -> None:
    """`python -m benchmarks.gpu --smoke`: every phase's code on the real architecture (one or two
    layers a component), so the one GPU run cannot die on a path no CPU ever took."""
    assert gpu.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    one = [r for r in rows if r["phase"] == "1-transformer"]
    timed = {(r["backend"], r["case"]) for r in one if r.get("s_per_cfg_step")}
    for case in ("two batch-1 passes", "batched CFG (mask)", "batch 2, no mask"):
        assert ("native", case) in timed
    # A backend that takes no mask is a row with its error, not the end of the run.
    refused = [r for r in one if r["backend"] == "_native_flash" and r["case"] == "batched CFG (mask)"]
    assert refused and "attn_mask" in refused[0]["error"]
    fastest = [r for r in one if r["case"] == "fastest"]
    assert len(fastest) == 1 and isinstance(fastest[0]["batched_cfg"], bool)
    two = [r for r in rows if r["phase"] == "2-pipeline"]
    assert [r["runtime"].split(" (")[0] for r in two] == ["plain diffusers", "ours"]
    for r in two:
        assert r["s_per_step"] > 0 and r["tokens"] > 4096  # the condition image at ~1 MP, and the text
        assert math.isclose(r["s_image_4_steps"], r["fixed_s"] + 4 * r["s_per_step"])
    three = [r for r in rows if r["phase"] == "3-memory"]
    assert three and all("error" not in r and r["host_ram_gb"] > 0 and r["estimated_peak_gb"] > 0 for r in three)
    table = (tmp_path / "gpu.md").read_text()
    for title in ("### 1. transformer alone", "### 2. whole pipeline", "### 3. memory modes"):
        assert title in table


@pytest.mark.timeout(1800)
def test_batching_benchmark_quick(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--jobs", "2", "--batch", "2", "--wait-ms", "2000"]
    assert batching.main([*args, "--model", str(tiny_models["edit"]), "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    data = json.loads((tmp_path / "batching" / "batching.json").read_text())
    rows = data["rows"]
    assert [r["path"] for r in rows] == [
        "direct, one by one",
        "direct, batches of 2",
        "server, batching off",
        "server, batch 2, wait 2000 ms",
    ]
    assert all(r["images_s"] > 0 for r in rows)
    assert rows[3]["p50_ms"] > 0 and rows[3]["images_s_ratio"] > 0
    assert "images/s" in stdout  # the printed table


@pytest.mark.timeout(1800)
def test_ab_quick(tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m benchmarks.ab`: two servers, sync jobs alternated, a second round with their places
    swapped; the estimate is the mean of the rounds' paired differences."""
    from benchmarks import ab

    root = str(Path(ab.ROOT))
    args = ["--a", root, "--b", root, "--jobs", "2", "--model", str(tiny_models["edit"]), "--out", str(tmp_path)]
    assert ab.main(args) == 0
    assert "B - A paired median" in capsys.readouterr().out
    data = json.loads((tmp_path / "ab.json").read_text())
    first, second, estimate = data["rounds"]
    assert first[0] == "1 (a first, b second)" and second[0] == "2 (b first, a second)"
    assert all(row[1] > 0 and row[2] > 0 for row in (first, second))  # ms added, each side
    assert data["estimate_ms"] == pytest.approx((first[3] + second[3]) / 2, abs=0.01)
    assert estimate[3] == round(data["estimate_ms"], 2)


def test_ab_checks_a_revision_out_and_removes_it() -> None:
    """A side given as a git revision runs from a worktree of that revision, gone afterwards."""
    import subprocess

    from benchmarks import ab

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ab.ROOT, capture_output=True, text=True, check=True)
    with ab.source_tree("HEAD") as tree:
        assert (tree / "server" / "cli.py").is_file() and tree != ab.ROOT
        at = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, check=True)
        assert at.stdout == head.stdout
    assert not tree.exists()
    listed = subprocess.run(["git", "worktree", "list"], cwd=ab.ROOT, capture_output=True, text=True, check=True)
    assert str(tree) not in listed.stdout
