"""Run in a body helper process by tests/test_bigbody.py: ``prepare_in_helper`` held at a gate, so
that the test can show the API answering while a big body is still being prepared. The gate is a
file (the helper is another process): ``<dir>/started`` says the helper has the body, ``<dir>/go``
lets it finish."""

from __future__ import annotations

import os
import time
from pathlib import Path

from server.media.prepare import PreparedBody, prepare_in_helper

GATE_ENV = "QWEN_EDIT_TEST_BODY_GATE"


def gated_prepare(raw: bytes, job_id: str) -> PreparedBody | None:
    gate = Path(os.environ[GATE_ENV])
    (gate / "started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not (gate / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting on the test's condition, in the helper
    return prepare_in_helper(raw, job_id)
