"""Several real processes on one PostgreSQL database: `qwen-edit worker`s and API-only replicas."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import ROOT, ServerProc, server_env


@dataclass
class WorkerProc:
    slot: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "worker", "--slot", str(self.slot)],
            cwd=ROOT,
            env={**os.environ, **self.env, "QWEN_EDIT_WORKER_ID": f"w{self.slot}"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(10)


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    workers: list[WorkerProc] = field(default_factory=list)
    apis: list[ServerProc] = field(default_factory=list)

    def add_worker(self, **extra: str) -> WorkerProc:
        slot = len(self.workers)
        w = WorkerProc(slot, {**self.env, **extra}, self.root / f"worker{slot}.log").start()
        self.workers.append(w)
        return w

    def add_api(self, wait_ready: bool = True, **extra: str) -> ServerProc:
        api = ServerProc(data_dir=self.root, env={**self.env, "QWEN_EDIT_EMBEDDED_WORKERS": "0", **extra})
        self.apis.append(api)
        return api.start(wait_ready=wait_ready, timeout=240)

    def completions(self) -> Counter[str]:
        """How many times each prediction id was completed by any worker (from their JSON logs)."""
        done: Counter[str] = Counter()
        for w in self.workers:
            for e in w.events():
                if e.get("event") == "job completed":
                    done[str(e.get("prediction_id"))] += 1
        return done

    def starts(self) -> Counter[str]:
        started: Counter[str] = Counter()
        for w in self.workers:
            for e in w.events():
                if e.get("event") == "job started":
                    started[str(e.get("prediction_id"))] += 1
        return started

    def wait_workers_ready(self, n: int, timeout: float = 240) -> None:
        """Until ``n`` live workers have loaded their model (workers a test stopped do not count)."""
        deadline = time.monotonic() + timeout
        live: list[WorkerProc] = []
        while time.monotonic() < deadline:
            live = [w for w in self.workers if w.proc and w.proc.poll() is None]
            if sum(1 for w in live if any(e.get("event") == "worker ready" for e in w.events())) >= n:
                return
            if len(live) < n:  # workers that exited never come back here: say why now, not at the deadline
                break
            time.sleep(0.5)
        logs = "\n".join(w.log_path.read_text()[-1500:] for w in self.workers)
        raise TimeoutError(f"{n} workers not ready ({len(live)} running):\n{logs}")

    def stop(self) -> None:
        for api in self.apis:
            api.stop()
        for w in self.workers:
            w.stop(30)


def cluster_env(root: Path, model_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = server_env(root, model_dir, QWEN_EDIT_DATABASE_URL=database_url, QWEN_EDIT_LOG_JSON="true")
    env.update(extra)
    return env
