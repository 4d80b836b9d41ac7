"""Start-up: a model that cannot load stops `qwen-edit serve` with a clear message, never ready."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_bad_model_folder_exits_non_zero_and_never_ready(make_server: Any, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "README.txt").write_text("no weights here")
    srv = make_server(start=False, QWEN_EDIT_MODEL=str(bad))
    srv.start(wait_ready=False)
    deadline = time.monotonic() + 180
    while srv.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            assert httpx.get(srv.url + "/readyz", timeout=2).status_code != 200
        time.sleep(0.3)
    assert srv.proc.returncode not in (None, 0), srv.log()
    log = srv.log()
    assert "is not a diffusers model folder: it has no model_index.json" in log
    assert "could not load the model" in log
