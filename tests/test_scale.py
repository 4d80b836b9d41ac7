"""benchmarks/scale.py in its quick mode: every cost measured at every step on SQLite (and on
PostgreSQL where one runs), and the notifier's submit rate with 0 and 4 idle workers. The table's
shape is checked, never a timing (benchmarks/RESULTS.md has the full run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import scale
from tests.support import PG_ADMIN, pg_available


def test_scale_quick(tmp_path: Path) -> None:
    argv = ["--quick", "--out", str(tmp_path)] + (["--postgres", PG_ADMIN] if pg_available() else [])
    assert scale.main(argv) == 0
    data = json.loads((tmp_path / "scale" / "scale.json").read_text())
    backends = ["sqlite", "postgresql"] if pg_available() else ["sqlite"]
    steps = [(b, "stored", n) for b in backends for n in (100, 1_000)]
    steps += [(b, "queued", n) for b in backends for n in (10, 100)]
    got = [(r["backend"], r["axis"], r[r["axis"]]) for r in data["rows"]]
    assert sorted(got) == sorted(steps)
    for row in data["rows"]:
        for cost in scale.COSTS:
            assert row[cost] > 0 and math.isfinite(row[cost]), row
    assert [n["backend"] for n in data["notify"]] == backends
    assert all(n["idle_0"] > 0 and n["idle_4"] > 0 for n in data["notify"])
    # Wake-one: a submit wakes one of the 4 idle workers (4.0 if it woke all; a submit that finds
    # none idle, all 4 between two waits, reaches every one of them, so not exactly 1.0).
    assert all(0 < n["wakes"] < 2.0 for n in data["notify"]), data["notify"]
    tables = (tmp_path / "scale" / "scale.md").read_text()
    assert tables.count("| stored jobs |") == len(backends) and "| x 10 |" in tables
