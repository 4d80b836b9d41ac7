"""Schemathesis against the app's own /openapi.json, with every check it has: no 5xx, responses and
their status codes, content types and headers as documented, schema-invalid requests refused and
schema-valid ones accepted, auth really enforced, 405s with Allow. The app runs in process (its
lifespan started by schemathesis) with a worker loop in a thread, so submitted jobs really run.

One exception, stated: a request whose bytes must be a real image (an upload, an edit's ``image``)
can be schema-valid and still refused, because JSON Schema cannot say "these bytes are a PNG"; for
those operations the positive-data check is off, every other check stays on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks as st_checks

from server.api.app import create_app
from tests.support import KEY1, FakeRunner, ThreadWorker, settings_for

EXAMPLES = 60  # per operation: about 1,300 requests, some 15 s on these machines
MEDIA_BEARING = {
    ("POST", "/api/v3/media/upload/binary"),
    ("POST", "/api/v2/media/upload/binary"),
    ("POST", "/v1/images/edits"),
}


def _needs_real_media(method: str, path: str) -> bool:
    return (method, path) in MEDIA_BEARING or (method == "POST" and path.startswith("/api/v3/wavespeed-ai/"))


@pytest.mark.e2e  # every operation fuzzed through the whole app: minutes
def test_api_conforms_to_its_schema_with_every_check(tmp_path: Path) -> None:
    st_checks.load_all_checks()
    everything = st_checks.CHECKS.get_all()
    assert len(everything) >= 10, [c.__name__ for c in everything]
    app_settings = settings_for(tmp_path / "data", sync_timeout_s=0.5)
    app = create_app(app_settings)
    worker = ThreadWorker(app_settings, FakeRunner()).start()
    failures: dict[str, str] = {}
    checked: list[str] = []
    started = time.monotonic()
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15
        for operation in operations:
            method, path = operation.method.upper(), operation.path
            checks = [
                c
                for c in everything
                if not (_needs_real_media(method, path) and c.__name__ == "positive_data_acceptance")
            ]

            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            def run(case: Any) -> None:
                case.call_and_validate(headers=KEY1, checks=checks)  # noqa: B023 - run() is called right here

            try:
                run()
            except BaseException as exc:  # schemathesis raises a (Base)ExceptionGroup of its findings
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures[f"{method} {path}"] = str(exc)[:2000]
            checked.append(f"{method} {path}")
    finally:
        worker.stop()
    print(f"fuzzed {len(checked)} operations x {EXAMPLES} examples in {time.monotonic() - started:.0f} s")
    assert not failures, "\n\n".join(f"{op}:\n{text}" for op, text in failures.items())
