"""Fixtures: the tiny model (built once per session) and the real server in a subprocess."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(size: tuple[int, int] = (80, 64), color: tuple[int, int, int] = (200, 40, 40), fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", size, color)
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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Edit model folder, built once per session, through `qwen-edit weights tiny`."""
    root = tmp_path_factory.mktemp("tiny")
    return {"edit": build_tiny(root / "edit", "edit")}


@dataclass
class ServerProc:
    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> ServerProc:
        self.log_path = self.data_dir / f"server-{int(time.time() * 1000)}.log"
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


@pytest.fixture
def make_server(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[Any]:
    """Start real servers (``qwen-edit serve``) with extra settings; all are stopped at teardown."""
    started: list[ServerProc] = []

    def make(data_dir: Path | None = None, start: bool = True, **extra: str) -> ServerProc:
        data = data_dir or tmp_path / f"data{len(started)}"
        srv = ServerProc(data_dir=data, env=server_env(data, tiny_models["edit"], **extra))
        started.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[ServerProc]:
    """One server shared by the whole session (the embedded default: SQLite, local files, one worker,
    warm-up on). Tests on it must not depend on what others left in its store."""
    data = tmp_path_factory.mktemp("server")
    srv = ServerProc(data_dir=data, env=server_env(data, tiny_models["edit"], QWEN_EDIT_WARMUP="true")).start()
    yield srv
    srv.stop()


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


@pytest.fixture(scope="module")
def image_host() -> Iterator[tuple[str, dict[str, tuple[int, bytes, dict[str, str]]]]]:
    """A local HTTP server for image URLs: (base URL, routes to fill in)."""
    routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
    handler = type("Handler", (_ImageHandler,), {"routes": routes})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    httpd.shutdown()


# --- PostgreSQL (scale-out tests) ----------------------------------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test (postgresql://…), dropped afterwards."""
    from tests.pgutil import fresh_database

    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_family(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model folders of all three variants (edit reused from ``tiny_models``). Built in this
    process (the CLI is exercised by ``tiny_models``): each CLI run imports diffusers afresh."""
    from weights.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-family")
    return {"edit": tiny_models["edit"]} | {v: build_tiny_model(root / v, v) for v in ("edit-plus", "edit-2511")}
