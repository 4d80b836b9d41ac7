"""Helpers the tests share: images, a real server in a subprocess, fakes for in-process tests
(a fake pipeline runner, an app without workers, a worker in a thread), PostgreSQL databases,
a tiny LoRA. Fixtures live in conftest.py; this module defines no fixture.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-1"
KEY1 = {"Authorization": f"Bearer {API_KEY}"}
KEY2 = {"Authorization": "Bearer test-key-2"}
MODEL = "wavespeed-ai/qwen-image/edit"
MODEL_URL = f"/api/v3/{MODEL}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(
    size: tuple[int, int] = (80, 64), color: tuple[int, int, int] = (200, 40, 40), fmt: str = "PNG", noise: bool = False
) -> bytes:
    img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # some structure, so encoders and the model see edges
        for y in range(size[1]):
            img.putpixel((x, y), (20, 20, 220))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def build_tiny(folder: Path, variant: str) -> Path:
    """A tiny model folder, built through the CLI a user would run (`qwen-edit weights tiny`)."""
    subprocess.run(
        [sys.executable, "-m", "server.cli", "weights", "tiny", str(folder), "--variant", variant],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return folder


@dataclass
class ServerProc:
    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    log_dir: Path | None = None  # where its log goes (default: data_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> ServerProc:
        self.log_path = (self.log_dir or self.data_dir) / f"server-{int(time.time() * 1000)}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process
        env = {**os.environ, **self.env, "QWEN_EDIT_PORT": str(self.port)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that kill() can take the whole process group
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until ``/readyz`` answers 200: the API is up and its workers have loaded the model."""
        self._wait_for("/readyz", timeout)

    def wait_live(self, timeout: float = 60.0) -> None:
        """Until ``/livez`` answers 200: the API serves, whether or not a worker is ready yet."""
        self._wait_for("/livez", timeout)

    def _wait_for(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{path} not 200 after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the server and its workers at once: a crash, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc:
            # Workers are in the same process group: make sure none outlives the test.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    # --- raw HTTP helpers ----------------------------------------------------------------

    def submit(self, body: dict[str, Any], model: str = "wavespeed-ai/qwen-image/edit", **kw: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/api/v3/{model}", json=body, headers=self.headers, timeout=120, **kw)

    def result(self, pid: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/api/v3/predictions/{pid}/result", headers=self.headers, timeout=10)
        r.raise_for_status()
        data: dict[str, Any] = r.json()["data"]
        return data

    def wait(self, pid: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.result(pid)
            assert data["status"] in ("created", "processing", "completed", "failed")
            if data["status"] in ("completed", "failed"):
                return data
            time.sleep(0.2)
        raise TimeoutError(f"{pid} not finished after {timeout}s:\n{self.log()}")


def server_env(data_dir: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        "QWEN_EDIT_DATA_DIR": str(data_dir),
        "QWEN_EDIT_MODEL": str(model_dir),
        "QWEN_EDIT_API_KEYS": f"{API_KEY},test-key-2",
        "QWEN_EDIT_DEFAULT_STEPS": "2",
        # Warm-up costs a full tiny edit per start; the shared session server keeps it on.
        "QWEN_EDIT_WARMUP": "false",
        "QWEN_EDIT_LEASE_S": "5",
        "QWEN_EDIT_LOG_LEVEL": "INFO",
        # Test receivers and image hosts run on loopback: the SSRF guard must let them through.
        "QWEN_EDIT_FETCH_ALLOW": "127.0.0.0/8",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def wait_live(srv: ServerProc) -> ServerProc:
    """Start an API-only server and wait for /livez (no worker will ever make it ready)."""
    srv.start(wait_ready=False)
    srv.wait_live(timeout=30)
    return srv


class _ImageHandler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}

    def do_GET(self) -> None:
        status, body, headers = self.routes.get(self.path, (404, b"not found", {}))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


# --- PostgreSQL ----------------------------------------------------------------------------------

PG_ADMIN = os.environ.get("QWEN_EDIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_base() -> str:
    return PG_ADMIN.rsplit("/", 1)[0]


def pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def terminate_sessions(url: str, timeout: float = 30) -> int:
    """End every session open on the database of ``url`` (what a database restart does to its
    clients) and return once they are gone; how many there were."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)).fetchall()
        pids = [pid for (pid,) in rows]
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        wait_for(
            lambda: (
                conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone() == (0,)
            ),
            timeout,
            "the terminated sessions to end",
        )
    return len(pids)


@contextlib.contextmanager
def database_refusing_connections(url: str) -> Iterator[None]:
    """While inside, the database of ``url`` accepts no connection and has none (a PostgreSQL that
    is down, for this database only; the server's other databases, other tests', go on)."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    terminate_sessions(url)
    try:
        yield
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """Create ``qe_<random>``, yield its URL (postgresql://…), drop it (and its sessions) after."""
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_ADMIN}")
    name = f"qe_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{pg_base()}/{name}"
    finally:
        try:
            with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except psycopg.Error:
            pass


# --- a tiny LoRA ---------------------------------------------------------------------------------


def build_tiny_lora(folder: Path, variant: str = "edit", seed: int = 1) -> Path:
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from weights.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(variant)
    torch.manual_seed(seed)
    # init_lora_weights=False: random A and B, so the adapter really changes the output.
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    with torch.no_grad():  # make the change large enough to survive 8-bit output images
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.mul_(50.0)
    layers = get_peft_model_state_dict(pipe.transformer)
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(folder, transformer_lora_layers=layers, weight_name="tiny_lora.safetensors")
    return folder / "tiny_lora.safetensors"


# --- fakes for in-process tests ------------------------------------------------------------------


class FakeRunner:
    """A pipeline runner with one behaviour per prompt word, for worker and API tests that need a
    job to end a certain way, fast, without the model (a real implementation of the worker's
    ``Runner`` interface, like cog's fixture predictors):

    ``raise``        the pipeline raises a RuntimeError (a bug in the model code): 1403
    ``valueerror``   a ValueError from deep inside a library (not the client's fault): 1403
    ``invalid``      the pipeline's own input check refuses: 1401
    ``oom``          CUDA out of memory: 5000, and the worker keeps serving
    ``hang``         each step waits until ``release`` is set (or the run is told to stop)
    ``slow``         each step takes ``slow_step_s``
    anything else    an image of the asked size, its colour from the seed
    """

    def __init__(self, slow_step_s: float = 0.05) -> None:
        self.slow_step_s = slow_step_s
        self.release = threading.Event()
        self.calls: list[Any] = []
        self.batches: list[int] = []
        self.finished = 0  # runs that returned a result

    def batch_signature(self, inputs: Any) -> tuple[Any, ...] | None:
        if len(inputs.images) != 1 or inputs.loras:
            return None
        return (inputs.width, inputs.height, inputs.num_inference_steps, inputs.true_cfg_scale)

    def run_batch(self, batch: list[Any], on_step: Any = None) -> list[Any]:
        self.batches.append(len(batch))
        return [self._run(inputs, on_step) for inputs in batch]

    def __call__(self, inputs: Any, on_step: Any = None) -> Any:
        return self._run(inputs, on_step)

    def _run(self, inputs: Any, on_step: Any) -> Any:
        from pipelines.errors import PipelineInputError
        from pipelines.runner import EditResult, RunCancelled

        self.calls.append(inputs)
        prompt = inputs.prompt
        total = inputs.num_inference_steps
        started = time.perf_counter()
        if on_step is not None:
            on_step(0, total)
        for step in range(1, total + 1):
            if "hang" in prompt:
                while not self.release.wait(0.02):
                    if on_step is not None and not on_step(step - 1, total):
                        raise RunCancelled()
            elif "slow" in prompt:
                time.sleep(self.slow_step_s)
            if on_step is not None and not on_step(step, total):
                raise RunCancelled()
        if "valueerror" in prompt:
            raise ValueError("operands could not be broadcast together (deep inside a library)")
        if "raise" in prompt:
            raise RuntimeError("the fake pipeline raised")
        if "invalid" in prompt:
            raise PipelineInputError("the prompt is too long for this model")
        if "oom" in prompt:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fake)")
        size = (inputs.width or inputs.images[0].size[0], inputs.height or inputs.images[0].size[1])
        color = (inputs.seed * 37 % 256, inputs.seed * 91 % 256, 128)
        self.finished += 1
        return EditResult(images=[Image.new("RGB", size, color)], seconds=time.perf_counter() - started + 0.001)


def settings_for(data_dir: Path, **overrides: Any) -> Any:
    """Settings of an in-process test: SQLite and files under ``data_dir``, the test keys, no warm-up."""
    from server.settings import Settings

    values: dict[str, Any] = {
        "data_dir": data_dir,
        "api_keys": [API_KEY, "test-key-2"],
        "default_steps": 2,
        "warmup": False,
        "lease_s": 5.0,
        "poll_interval_s": 0.2,
        "fetch_allow": ["127.0.0.0/8"],
    }
    values.update(overrides)
    return Settings(**values)


class ThreadWorker:
    """A real ``Worker`` (claim loop, executor, heartbeat) in a thread of the test process, on the
    same store and storage as the app under test, running a given runner (a FakeRunner, or the
    tiny model's real EditRunner)."""

    def __init__(self, settings: Any, runner: Any, worker_id: str = "test/0") -> None:
        from pipelines.registry import get_variant
        from server.jobs.store import JobStore
        from server.storage.factory import build_storage
        from server.worker.loop import Worker

        self.store = JobStore.open(settings)
        self.store.migrate()
        self.worker = Worker(settings, self.store, build_storage(settings), get_variant(settings.variant), worker_id)
        self.runner = runner
        self.thread = threading.Thread(target=self._serve, name="test-worker", daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        from server.worker.safety import SafetyChecker

        try:
            self.worker.serve(self.runner, SafetyChecker.load(self.worker.settings))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> ThreadWorker:
        self.worker.start()
        self.thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self.worker.drain()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the worker did not stop"
        self.store.close()
        if self.error is not None:
            raise self.error


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "the condition") -> Any:
    """Poll ``condition`` until it returns something truthy; that value. Never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {timeout}s")
        time.sleep(0.02)


def wait_status(store: Any, job_id: str, statuses: set[Any], timeout: float = 60) -> Any:
    """The job once its status is one of ``statuses``."""

    def reached() -> Any:
        job = store.get(job_id)
        return job if job is not None and job.status in statuses else None

    return wait_for(reached, timeout, f"{job_id} reaching {statuses}")


# --- JavaScript clients (tests/js: real packages from npm) ---------------------------------------

JS_DIR = ROOT / "tests" / "js"


def js_clients_ready() -> str | None:
    """None when node and tests/js's packages are there (installed here from the lockfile if
    missing, as .ci/run does); else why not."""
    import shutil

    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not installed"
    if not (JS_DIR / "node_modules").is_dir():
        proc = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            return f"npm ci failed: {proc.stderr[-500:]}"
    return None


def require_js() -> None:
    """The JS clients are part of what is tested: their absence is a failure that says why."""
    why_not = js_clients_ready()
    if why_not is not None:
        pytest.fail(f"the JavaScript clients cannot run here ({why_not}); install Node 20 and npm")


def run_js(script: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``tests/js/<script>`` with ``args``; its JSON summary (stdout's last line)."""
    import json

    proc = subprocess.run(["node", script, *args], cwd=JS_DIR, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"node {script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    # Node exits 0 when its event loop drains, even with a call still awaited: say so, not IndexError.
    assert proc.stdout.strip(), f"node {script} exited 0 before printing its result:\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def python_sdk_chain(base_url: str, image_path: Path, *, sync: bool) -> list[str]:
    """Three chained edits with the official Python SDK (wavespeed 2.0.5), as its users write them:
    upload a picture, edit it, edit each output again. Only the base URL changes."""
    import wavespeed

    client = wavespeed.Client(api_key=API_KEY, base_url=base_url)
    image = client.upload(str(image_path))
    steps = [image]
    for prompt in ("make it blue", "add a hat", "turn it into a watercolor"):
        body = {"prompt": prompt, "image": image, "size": "256*256"}
        out = client.run(MODEL, body, enable_sync_mode=sync) if sync else client.run(MODEL, body, poll_interval=0.2)
        image = out["outputs"][0]
        steps.append(image)
    return steps
