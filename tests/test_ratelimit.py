"""Per-key rate and concurrency limits, the queue cap and the body cap, on the app in process with
no workers (so that accepted jobs stay queued and the counts are exact)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import KEY1, KEY2, MODEL_URL, data_uri, png_bytes, settings_for

BODY = {"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from server.api.app import create_app

    settings = settings_for(
        tmp_path_factory.mktemp("limited"),
        rate_limit_per_minute=8,
        max_jobs_per_key=3,
        queue_cap=5,
        max_body_bytes=1_000_000,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def submit(client: Any, headers: dict[str, str], body: Any = BODY) -> Any:
    return client.post(MODEL_URL, json=body, headers=headers)


def assert_429(r: Any, fragment: str) -> None:
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    body = r.json()
    assert body["code"] == 429 and fragment in body["message"], body


def test_concurrency_limit_per_key_then_queue_cap(limited: Any) -> None:
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
    cancel = limited.post(f"/api/v3/predictions/{ids[0]}/cancel", headers=KEY1)
    assert cancel.json()["data"].get("status") == "failed", cancel.text
    assert submit(limited, KEY1).status_code == 200
    # Accepted jobs are all still there, and polls answer while the limits bite.
    for pid in ids[1:]:
        r = limited.get(f"/api/v3/predictions/{pid}/result", headers=KEY1)
        assert r.status_code == 200 and r.json()["data"]["status"] == "created"


def test_rate_limit_per_key(limited: Any) -> None:
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
        assert limited.get(f"/api/v3/predictions/{'0' * 32}/result", headers=KEY2).status_code == 404


def test_body_cap_413(limited: Any) -> None:
    big = {"prompt": "x", "image": "A" * 1_200_000}
    r = submit(limited, KEY1, big)
    assert r.status_code == 413 and r.json()["code"] == 413, r.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"prompt": "x", "image": "'
        for _ in range(20):
            yield b"A" * 100_000
        yield b'"}'

    r = limited.post(MODEL_URL, content=chunks(), headers={**KEY1, "Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["message"], r.text
