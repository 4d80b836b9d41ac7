"""Fixtures only (helpers live in tests/support.py): the tiny models, real servers in subprocesses,
in-process apps and workers, an image host, PostgreSQL databases."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    FakeRunner,
    ServerProc,
    ThreadWorker,
    _ImageHandler,
    fresh_database,
    server_env,
    settings_for,
)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Edit model folder, built once per session in this process (the CLI that users run
    to build one, `qwen-edit weights tiny`, has its own end-to-end test in test_tiny.py)."""
    from weights.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {"edit": build_tiny_model(root / "edit", "edit")}


@pytest.fixture(scope="session")
def tiny_family(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model folders of all three variants (edit reused from ``tiny_models``). Built in this
    process (the CLI is exercised by ``tiny_models``): each CLI run imports diffusers afresh."""
    from weights.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-family")
    return {"edit": tiny_models["edit"]} | {v: build_tiny_model(root / v, v) for v in ("edit-plus", "edit-2511")}


# --- real servers (end-to-end) -------------------------------------------------------------------


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


# --- in process ----------------------------------------------------------------------------------


@pytest.fixture
def app_settings(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """Settings of an in-process app: SQLite and files under the test's tmp dir. Parametrize it
    indirectly with a dict to change settings: ``@pytest.mark.parametrize("app_settings", [{...}], indirect=True)``."""
    return settings_for(tmp_path / "data", **getattr(request, "param", {}))


@pytest.fixture
def api(app_settings: Any) -> Iterator[Any]:
    """The app in process (``TestClient``: its lifespan runs), without workers: jobs stay queued."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app

    with TestClient(create_app(app_settings)) as client:
        yield client


@pytest.fixture
def fake_runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def fake_worker(app_settings: Any, fake_runner: FakeRunner) -> Iterator[ThreadWorker]:
    """A real worker loop in a thread, on the app's store and storage, running the fake runner."""
    worker = ThreadWorker(app_settings, fake_runner).start()
    yield worker
    fake_runner.release.set()
    worker.stop()


@pytest.fixture
def stack(api: Any, fake_worker: ThreadWorker) -> Any:
    """The in-process app with a fake worker serving its jobs: ``stack.post(...)`` as with ``api``."""
    return api


# --- outside services ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_host() -> Iterator[tuple[str, dict[str, tuple[int, bytes, dict[str, str]]]]]:
    """A local HTTP server for image URLs: (base URL, routes to fill in)."""
    routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
    handler = type("Handler", (_ImageHandler,), {"routes": routes})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    httpd.shutdown()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test (postgresql://…), dropped afterwards."""
    with fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A migrated job store, once on each database: SQLite under ``tmp_path``, PostgreSQL in a fresh
    database (a pool of up to 12 connections, opened as they are needed). A module whose tests need
    one database, or a store shared by its tests, defines its own ``store``."""
    from server.jobs.store import JobStore
    from server.settings import Settings

    if request.param == "sqlite":
        s = JobStore.at(f"sqlite:///{tmp_path / 'jobs.db'}", run_dir=tmp_path / "run")
    else:
        s = JobStore.open(Settings(database_url=request.getfixturevalue("pg_url")), pool_size=12)
    s.migrate()
    yield s
    s.close()
