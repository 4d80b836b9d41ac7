"""Per-key rate and concurrency limits, the queue cap and the body cap, on a real server with no
workers (so that accepted jobs stay queued and the counts are exact)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProc, data_uri, png_bytes

MODEL_URL = "/api/v3/wavespeed-ai/qwen-image/edit"
KEY1 = {"Authorization": "Bearer test-key-1"}
KEY2 = {"Authorization": "Bearer test-key-2"}
BODY = {"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256"}


def wait_live(srv: ServerProc) -> ServerProc:
    srv.start(wait_ready=False)
    srv.wait_live(timeout=30)
    return srv


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Any]) -> Iterator[ServerProc]:
    from tests.conftest import server_env

    data = tmp_path_factory.mktemp("limited")
    env = server_env(
        data,
        tiny_models["edit"],
        QWEN_EDIT_EMBEDDED_WORKERS="0",
        QWEN_EDIT_RATE_LIMIT_PER_MINUTE="8",
        QWEN_EDIT_MAX_JOBS_PER_KEY="3",
        QWEN_EDIT_QUEUE_CAP="5",
        QWEN_EDIT_MAX_BODY_BYTES="1000000",
    )
    srv = wait_live(ServerProc(data_dir=data, env=env))
    yield srv
    srv.stop()


def submit(srv: ServerProc, headers: dict[str, str], body: Any = BODY) -> httpx.Response:
    return httpx.post(srv.url + MODEL_URL, json=body, headers=headers, timeout=30)


def assert_429(r: httpx.Response, fragment: str) -> None:
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    body = r.json()
    assert body["code"] == 429 and fragment in body["message"], body


def test_concurrency_limit_per_key_then_queue_cap(limited: ServerProc) -> None:
    ids = []
    for _ in range(3):
        r = submit(limited, KEY1)
        assert r.status_code == 200, r.text
        ids.append(r.json()["data"]["id"])
    assert_429(submit(limited, KEY1), "in flight")
    # Another key has its own allowance...
    for _ in range(2):
        assert submit(limited, KEY2).status_code == 200
    # ...until the queue itself is full (5).
    assert_429(submit(limited, KEY2), "queue is full")
    # Cancelling frees a slot of the key and of the queue.
    cancel = httpx.post(f"{limited.url}/api/v3/predictions/{ids[0]}/cancel", headers=KEY1, timeout=10)
    assert cancel.json()["data"].get("status") == "failed", cancel.text
    assert submit(limited, KEY1).status_code == 200
    # Accepted jobs are all still there, and polls answer while the limits bite.
    for pid in ids[1:]:
        r = httpx.get(f"{limited.url}/api/v3/predictions/{pid}/result", headers=KEY1, timeout=10)
        assert r.status_code == 200 and r.json()["data"]["status"] == "created"


def test_rate_limit_per_key(limited: ServerProc) -> None:
    # KEY2 spent 3 of its 8 tokens above; the queue is full, so each submit is a 429 that still
    # spends a token, until the rate limit answers first.
    messages = []
    for _ in range(12):
        r = submit(limited, KEY2)
        assert r.status_code == 429
        messages.append(r.json()["message"])
        if "Rate limit" in r.json()["message"]:
            assert_429(r, "8 requests per minute")
            break
    else:
        pytest.fail(f"no rate limit answer: {messages}")
    # Polling is not rate limited.
    for _ in range(10):
        assert httpx.get(f"{limited.url}/api/v3/predictions/{'0' * 32}/result", headers=KEY2).status_code == 404


def test_body_cap_413(limited: ServerProc) -> None:
    big = {"prompt": "x", "image": "A" * 1_200_000}
    r = submit(limited, KEY1, big)
    assert r.status_code == 413 and r.json()["code"] == 413, r.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"prompt": "x", "image": "'
        for _ in range(20):
            yield b"A" * 100_000
        yield b'"}'

    r = httpx.post(limited.url + MODEL_URL, content=chunks(), headers={**KEY1, "Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["message"], r.text
