"""The framework floor: a bare FastAPI app under the same uvicorn, doing the least the real routes
must (parse a JSON body into a pydantic model; answer a result envelope of the same size), with no
store, no storage, no middleware. benchmarks/overhead.py runs it beside the server, in the same run,
and gives each endpoint's throughput as a fraction of the floor's.

    python -m benchmarks.floor --port 8001     # serve it alone (overhead.py starts its own)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks.report import percentiles, print_table

ROOT = Path(__file__).resolve().parent.parent

RESULT: dict[str, Any] = {
    "code": 200,
    "message": "success",
    "data": {
        "id": "0" * 32,
        "model": "wavespeed-ai/qwen-image/edit",
        "outputs": ["http://127.0.0.1:8000/files/outputs/" + "0" * 32 + "/0-000000000000.jpeg"],
        "urls": {"get": "http://127.0.0.1:8000/api/v3/predictions/" + "0" * 32 + "/result"},
        "has_nsfw_contents": [False],
        "status": "completed",
        "created_at": "2026-01-01T00:00:00.000Z",
        "error": "",
        "executionTime": 100,
        "timings": {"inference": 100},
    },
}


class Body(BaseModel):
    prompt: str
    image: str | None = None
    size: str | None = None
    seed: int = -1


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/api/v3/predictions/{prediction_id}/result")
    async def result(prediction_id: str) -> dict[str, Any]:
        return {**RESULT, "data": {**RESULT["data"], "id": prediction_id}}

    @app.post("/api/v3/wavespeed-ai/qwen-image/edit")
    async def submit(body: Body) -> dict[str, Any]:
        return {**RESULT, "data": {**RESULT["data"], "status": "created", "created_at": str(time.time())}}

    return app


def start_floor(port: int) -> subprocess.Popen[bytes]:
    """The floor app in a process of its own, as the server runs in one."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.floor", "--port", str(port)], cwd=ROOT, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("floor app not up after 60 s")


def compare_to_floor(
    measured: dict[str, tuple[float, float, list[float]]], goals: dict[str, float]
) -> list[dict[str, Any]]:
    """Per endpoint: (server req/s, floor req/s, floor latencies ms) -> a row with the fraction."""
    rows: list[dict[str, Any]] = []
    for endpoint, (server_rps, floor_rps, floor_ms) in measured.items():
        rows.append(
            {
                "endpoint": endpoint,
                "server_req_s": server_rps,
                "floor_req_s": floor_rps,
                "floor_p50": percentiles(floor_ms)["p50"],
                "fraction": server_rps / floor_rps,
                "goal": goals[endpoint],
            }
        )
    return rows


def floor_table(rows: list[dict[str, Any]], clients: int) -> str:
    return print_table(
        f"Throughput against the framework floor (bare FastAPI, same uvicorn, {clients} clients, same run)",
        ["endpoint", "server req/s", "floor req/s", "floor p50 ms", "fraction", "goal"],
        [[r["endpoint"], r["server_req_s"], r["floor_req_s"], r["floor_p50"], r["fraction"], r["goal"]] for r in rows],
    )


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__)
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    uvicorn.run(build_app(), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
