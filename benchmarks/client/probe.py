"""How many result polls per second this client can drive: ``python -m benchmarks.client.probe``.

It submits one job, waits for it, then reads its result (``GET /api/v3/predictions/{id}/result``,
what every async request polls) from ``-c`` concurrent loops on the same kind of HTTP client the
benchmark uses, for ``--seconds``. It prints requests per second and the client's own CPU seconds
per request: when the client's CPU per request times the rate nears one core, the client (not the
server) is the limit, and its figures at that load are not to be trusted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import httpx

from benchmarks.client.backends import Options
from benchmarks.client.inputs import builtin


async def probe(url: str, key: str, seconds: float, concurrency: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:
        inp = builtin()[4]
        body = {"prompt": inp.prompt, "image": inp.image, "size": "256*256", "num_inference_steps": 2}
        r = await client.post(f"/api/v3/{Options().model}", json=body | {"enable_sync_mode": True})
        r.raise_for_status()
        path = f"/api/v3/predictions/{r.json()['data']['id']}/result"
        count = errors = 0
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal count, errors
            while time.perf_counter() < deadline:
                try:
                    ok = (await client.get(path)).status_code == 200
                except httpx.HTTPError:  # a dropped connection under load counts, and the loop goes on
                    ok = False
                count += ok
                errors += not ok

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    per_req = cpu / max(count + errors, 1) * 1000
    return {"requests": count, "errors": errors, "req_s": count / wall, "client_cpu_ms_per_req": per_req}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.client.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=os.environ.get("WAVESPEED_API_KEY") or "")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("-c", "--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    try:
        out = asyncio.run(probe(args.url, args.key, args.seconds, args.concurrency))
    except httpx.HTTPError as exc:
        print(f"probe: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(
        f"{out['requests']} result reads in {args.seconds:g} s from {args.concurrency} loops: "
        f"{out['req_s']:.0f} req/s, {out['errors']:.0f} errors, client CPU {out['client_cpu_ms_per_req']:.2f} ms/req"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
