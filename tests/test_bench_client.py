"""``qwen-edit bench`` (benchmarks/client/): each point of issue 19 against a real server of this
project on the tiny model. The client runs in this process (``main``), except where the point is
the process itself (the core install, Ctrl-C). No timing thresholds: numbers are checked for
presence and consistency only."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.client import main
from benchmarks.client.compare import median_ratio_ci
from benchmarks.client.inputs import builtin
from benchmarks.client.metrics import Goodput
from benchmarks.client.schedule import arrivals
from tests.core_install import core_env
from tests.support import API_KEY, ROOT, ServerProc, wait_for

QUICK = ["--steps", "2", "--size", "256*256", "--quiet"]


def bench(out: Path, *args: str) -> tuple[int, dict[str, Any]]:
    rc = main([*args, *QUICK, "--out", str(out)])
    return rc, json.loads((out / "bench.json").read_text())


# --- no server ----------------------------------------------------------------------------------


def test_arrivals_are_seeded_poisson_or_gamma() -> None:
    a = arrivals(2000, rate=4.0, burstiness=1.0, seed=7)
    assert a == arrivals(2000, rate=4.0, burstiness=1.0, seed=7) and a != arrivals(2000, 4.0, 1.0, seed=8)
    assert a[0] == 0 and all(x <= y for x, y in itertools.pairwise(a))
    assert a[-1] / 1999 == pytest.approx(0.25, rel=0.1)  # the mean gap is 1 / rate
    gaps = [y - x for x, y in itertools.pairwise(a)]
    bursty = [y - x for x, y in itertools.pairwise(arrivals(2000, 4.0, 0.25, seed=7))]
    cv = lambda g: math.sqrt(sum((x - sum(g) / len(g)) ** 2 for x in g) / len(g)) / (sum(g) / len(g))  # noqa: E731
    assert cv(bursty) > 1.5 * cv(gaps)  # burstiness < 1: the same mean, more spread
    assert arrivals(3, float("inf")) == [0.0, 0.0, 0.0]


def test_builtin_inputs_vary_in_size_and_prompt() -> None:
    inputs = builtin()
    assert len({i.image_bytes for i in inputs}) == len(inputs) >= 5

    from PIL import Image

    sizes = {Image.open(io.BytesIO(i.image_bytes or b"")).size for i in inputs}
    assert len(sizes) >= 5 and len({w / h for w, h in sizes}) >= 4
    assert max(len(i.prompt) for i in inputs) > 5 * min(len(i.prompt) for i in inputs)


def test_goodput_parse_and_bootstrap() -> None:
    assert Goodput.parse(["e2el:30000", "queue:5.5"]).limits == {"e2el": 30000.0, "queue": 5.5}
    with pytest.raises(ValueError, match="METRIC:MS"):
        Goodput.parse(["ttft:10"])
    same = median_ratio_ci([100.0, 101, 99, 100, 102] * 4, [100.0, 99, 101, 100, 98] * 4)
    assert same[1] <= 1 <= same[2]
    faster = median_ratio_ci([50.0, 51, 49, 50] * 5, [100.0, 101, 99, 100] * 5)
    assert faster[2] < 1


def test_a_submit_in_flight_when_the_run_stops_has_its_job_cancelled() -> None:
    """Ctrl-C while a submit is on its way: the request ends as interrupted at once, but the
    server may still create the job. Its answer is awaited, and the job is cancelled with the
    others, instead of running for nobody."""
    from benchmarks.client.backends import Options, backend
    from benchmarks.client.runner import Endpoint, Runner
    from benchmarks.client.schedule import Load

    async def scenario() -> None:
        arrived, answer = asyncio.Event(), asyncio.Event()
        cancelled: list[str] = []

        async def server(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/cancel"):
                cancelled.append(request.url.path.split("/")[-2])
                return httpx.Response(200, json={"code": 200, "data": {}})
            arrived.set()
            await answer.wait()  # the submit is in flight when the run stops
            return httpx.Response(200, json={"code": 200, "data": {"id": "j1", "status": "created"}})

        async with httpx.AsyncClient(transport=httpx.MockTransport(server), base_url="http://s") as client:
            ep = Endpoint("a", "http://s", backend("v3", Options()), client)
            stop = asyncio.Event()
            runner = Runner([ep], builtin()[:1], seed=0, timeout_s=60, stop=stop)
            run = asyncio.ensure_future(runner.run(Load(rate=None, concurrency=1), 1))
            await arrived.wait()
            stop.set()
            [record] = (await run)["a"][0]
            assert record.code == "interrupted" and not record.ok
            answer.set()  # the server answers after the client stopped waiting
            assert await runner.cancel_unfinished() == 1
            assert cancelled == ["j1"] and record.id == "j1"

    asyncio.run(scenario())


def test_a_figure_that_cannot_be_drawn_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.client import report

    run: dict[str, Any] = {"name": "x", "results": [{"broken": True}]}  # no figures in it
    report.write_numbers(run, [], tmp_path, "x")
    assert report.try_plot(run, tmp_path, "x") is False
    assert "warning: x.png not drawn" in capsys.readouterr().err
    assert json.loads((tmp_path / "x.json").read_text()) == run and (tmp_path / "x.csv").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--backend", "grpc"], "invalid choice: 'grpc'"),
        (["--goodput", "e2el=5"], "--goodput 'e2el=5'"),
        (["--url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
        (["--request-rate", "0"], "request rate must be > 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], says: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.client", *args, "--out", str(tmp_path), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# --- against the tiny model ---------------------------------------------------------------------


@pytest.mark.e2e
def test_refused_key_is_one_line_and_exit_2(
    server: ServerProc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--url", server.url, "--key", "wrong", "--out", str(tmp_path), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "refused the key (HTTP 401)" in err and err.count("\n") == 1
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.e2e
def test_open_loop_sweep_two_endpoints_goodput_and_compare(
    server: ServerProc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two endpoints (v3 async and the OpenAI door of the same server) on one schedule, a sweep of two
    rates, warm-up, goodput; then compare against a closed-loop run."""
    rc, run = bench(
        tmp_path / "a",
        *("--url", f"v3={server.url}", f"openai={server.url}", "--backend", "v3", "openai"),
        *("--key", API_KEY, "-n", "3", "--request-rate", "1", "inf", "--num-warmups", "1"),
        *("--goodput", "e2el:600000", "--metric-percentiles", "50,95", "--seed", "3"),
    )
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "e2el p95 ms" in out and "sustains inf req/s" in out
    assert [(r["label"], r["load"]) for r in run["results"]] == [
        ("v3", "1 req/s"),
        ("openai", "1 req/s"),
        ("v3", "inf req/s"),
        ("openai", "inf req/s"),
    ]
    for key in ("date", "backend", "model_id", "command", "client_version", "percentiles", "resolution"):
        assert run[key] is not None
    assert run["backend"] == "v3,openai" and run["interrupted"] is False
    assert run["endpoints"][0]["server"]["default_steps"] == 2 and run["endpoints"][0]["server"]["device"]
    for r in run["results"]:
        assert r["num_prompts"] == r["completed"] == 3 and r["failed"] == 0 and r["errors"] == {}
        assert r["request_throughput"] > 0 and r["request_goodput"] == pytest.approx(r["request_throughput"])
        assert r["median_e2el_ms"] > 0 and r["p95_e2el_ms"] >= r["median_e2el_ms"] and "p99_e2el_ms" not in r
        assert len(r["e2els_ms"]) == 3 and r["median_download_ms"] > 0
    v3 = run["results"][0]
    assert v3["median_inference_ms"] > 0 and v3["median_upload_ms"] > 0 and v3["median_queue_ms"] >= 0
    assert v3["median_e2el_ms"] >= v3["median_inference_ms"]
    assert run["resolution"]["max_resolution_ms"] is not None
    assert run["capacity"]["v3"]["load"] == "inf req/s"
    rows = list(csv.DictReader((tmp_path / "a" / "bench.csv").open()))
    assert len(rows) == 12 and {r["endpoint"] for r in rows} == {"v3", "openai"}
    v3_rows = [r for r in rows if r["endpoint"] == "v3"]
    assert all(r["ok"] == "True" and r["id"] and int(r["polls"]) >= 1 for r in v3_rows)
    # The same inputs for both endpoints, request by request.
    assert [r["input"] for r in v3_rows] == [r["input"] for r in rows if r["endpoint"] == "openai"]
    assert (tmp_path / "a" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Closed loop, two endpoints (here the same server twice, sync and async): one slot each, the
    # same inputs request by request.
    rc, closed = bench(
        tmp_path / "b",
        *("--url", f"async={server.url}", f"sync={server.url}", "--backend", "v3", "v3-sync"),
        *("--key", API_KEY, "-n", "3", "-c", "1", "--burstiness", "0.5", "--num-warmups", "0"),
    )
    assert rc == 0 and [(r["label"], r["load"]) for r in closed["results"]] == [("async", "C=1"), ("sync", "C=1")]
    assert all(r["completed"] == 3 and r["max_concurrency"] == 1 for r in closed["results"])
    rows = list(csv.DictReader((tmp_path / "b" / "bench.csv").open()))
    by = {e: [r["input"] for r in rows if r["endpoint"] == e] for e in ("async", "sync")}
    assert by["async"] == by["sync"] and len(by["async"]) == 3
    assert main(["compare", str(tmp_path / "a" / "bench.json"), str(tmp_path / "b")]) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "ratio 95% CI" in table


@pytest.mark.e2e
def test_sync_backend_and_dataset(server: ServerProc, tmp_path: Path) -> None:
    from tests.support import png_bytes

    (tmp_path / "in.png").write_bytes(png_bytes((96, 64)))
    dataset = tmp_path / "set.jsonl"
    dataset.write_text(json.dumps({"prompt": "make it green", "image": "in.png", "size": "256*256"}) + "\n")
    rc = main(
        [
            *("--url", server.url, "--key", API_KEY, "--backend", "v3-sync", "-n", "2", "--dataset", str(dataset)),
            *("--request-rate", "inf", "--max-concurrency", "1"),  # all due at once, one at a time
            *("--steps", "2", "--no-download", "--num-warmups", "0", "--out", str(tmp_path), "--quiet"),
        ]
    )
    run = json.loads((tmp_path / "bench.json").read_text())
    assert rc == 0 and run["download"] is False and run["inputs"] == str(dataset)
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert [r["input"] for r in rows] == ["set-1", "set-1"]
    assert all(r["polls"] == "0" and r["download_ms"] == "" and float(r["e2el_ms"]) > 0 for r in rows)
    assert run["results"][0]["max_concurrency"] == 1 and run["results"][0]["load"] == "inf req/s C<=1"
    assert float(rows[1]["sent_at_s"]) * 1000 >= float(rows[0]["e2el_ms"])  # the cap held the second back


@pytest.mark.e2e
def test_failures_are_counted_by_code_and_exit_1(server: ServerProc, tmp_path: Path) -> None:
    # 500 steps is over the server's max_steps: every request is refused with a 400.
    rc = main(["--url", server.url, "--key", API_KEY, "-n", "2", "--steps", "500", "--out", str(tmp_path), "--quiet"])
    run = json.loads((tmp_path / "bench.json").read_text())
    assert rc == 1
    r = run["results"][0]
    assert r["failed"] == 2 and r["errors"] == {"http 400": 2} and r["median_e2el_ms"] is None and r["e2els_ms"] == []


@pytest.mark.e2e
def test_ctrl_c_cancels_unfinished_jobs_and_writes_what_finished(server: ServerProc, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "benchmarks.client", "--url", server.url, "--key", API_KEY),
            *("-n", "6", "-c", "2", "--steps", "40", "--size", "256*256", "--num-warmups", "0"),
            *("--out", str(tmp_path), "--quiet"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def running() -> bool:
        return httpx.get(f"{server.url}/readyz").json()["queued"] >= 1

    wait_for(running, timeout=120, what="the benchmark's jobs queued")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "cancelled" in err and "Traceback" not in err
    run = json.loads((tmp_path / "bench.json").read_text())
    assert run["interrupted"] is True
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    stopped = [r for r in rows if r["code"] == "interrupted"]
    assert stopped and len(rows) < 6
    for r in stopped:  # cancelled on the server: it fails them, queued at once, running at the next step
        assert server.wait(r["id"])["status"] == "failed"


@pytest.mark.e2e
def test_works_after_the_first_command_alone(server: ServerProc, tmp_path: Path) -> None:
    """The README's first command installs the core only: bench draws its figure there too."""
    cli = Path(sys.executable).with_name("qwen-edit")
    proc = subprocess.run(
        [str(cli), "bench", "--url", server.url, "--key", API_KEY, "-n", "1", "--num-warmups", "0", *QUICK],
        cwd=tmp_path,
        env=core_env(tmp_path / "core"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr and "e2el p50 ms" in proc.stdout
    assert (tmp_path / "bench-out" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
