"""Sync requests whose client gives up: the hold is ``QWEN_EDIT_SYNC_TIMEOUT_S``, and a client that
hangs up while its job is still queued takes the job with it (nobody holds its id). Driven at the
ASGI level, in process, so that the test decides when the client disconnects; no worker runs, so
jobs stay queued until then."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from server.api import submit as submit_module
from server.api.hold import GONE_REASON
from server.jobs.contract import Status
from tests.support import API_KEY, KEY1, MODEL_URL, data_uri, png_bytes


async def _hang_up_while_queued(app: Any, path: str, body: bytes, content_type: str, queued: int) -> int:
    """Send one request, hang up once ``queued`` jobs wait in the store; the status it was answered with."""
    store = app.state.services.store
    hung_up = anyio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    headers = [(b"host", b"testserver"), (b"authorization", f"Bearer {API_KEY}".encode())]
    headers += [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, scope, receive, send)
        with anyio.fail_after(30):
            while (await anyio.to_thread.run_sync(store.count_by_status))["created"] < queued:
                await anyio.sleep(0.02)
        hung_up.set()
    return statuses[0]


@pytest.fixture
def ids(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids the next jobs get, in order."""
    issued = [f"hold{i}" for i in range(4)]
    queue = list(issued)
    monkeypatch.setattr(submit_module, "new_id", lambda: queue.pop(0))
    return issued


def _failed_for_hang_up(api: Any, job_id: str) -> None:
    job = api.app.state.services.store.get(job_id)
    assert job is not None and job.status == Status.FAILED and job.error == GONE_REASON, job


def test_v3_sync_request_whose_client_hangs_up_cancels_its_queued_job(api: Any, ids: list[str]) -> None:
    body = httpx.Request(
        "POST", "http://x", json={"prompt": "x", "image": data_uri(png_bytes()), "enable_sync_mode": True}
    )
    status = api.portal.call(_hang_up_while_queued, api.app, MODEL_URL, body.read(), "application/json", 1)
    assert status == 499
    _failed_for_hang_up(api, ids[0])
    # The result says so to anyone who asks later.
    data = api.get(f"/api/v3/predictions/{ids[0]}/result", headers=KEY1).json()["data"]
    assert data["status"] == "failed" and data["error"] == GONE_REASON


def test_openai_request_whose_client_hangs_up_cancels_its_queued_jobs(api: Any, ids: list[str]) -> None:
    request = httpx.Request(
        "POST", "http://x", files={"image": ("a.png", png_bytes(), "image/png")}, data={"prompt": "x", "n": "2"}
    )
    body = request.read()
    status = api.portal.call(
        _hang_up_while_queued, api.app, "/v1/images/edits", body, request.headers["content-type"], 2
    )
    assert status == 499
    for job_id in ids[:2]:
        _failed_for_hang_up(api, job_id)


@pytest.mark.parametrize("app_settings", [{"sync_timeout_s": 0.3}], indirect=True)
def test_the_hold_is_a_setting_and_a_job_still_queued_at_its_end_goes_on(api: Any) -> None:
    r = api.post(
        MODEL_URL, json={"prompt": "x", "image": data_uri(png_bytes()), "enable_sync_mode": True}, headers=KEY1
    )
    data = r.json()["data"]
    assert r.status_code == 200 and data["status"] == "processing" and data["code"] == 5004
    assert "0.3 seconds" in data["error"]
    job = api.app.state.services.store.get(data["id"])
    assert job is not None and job.status == Status.CREATED  # not cancelled: the client got its id
