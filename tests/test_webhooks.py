"""Webhook signing (unit) and delivery through the app in process (a fake worker ends the jobs, a
real HTTP receiver on loopback), verified the way API.md tells receivers to."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from server.api.tasks.webhooks import backoff_s, sign
from server.jobs.store import JobStore
from tests.support import KEY1, MODEL_URL, data_uri, png_bytes, wait_for


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check, written from the vendor's docs (not from our code)."""
    key = secret[len("whsec_") :].encode()
    ts = int(headers["webhook-timestamp"])
    if abs(time.time() - ts) > 300:
        return False
    expected = hmac.new(key, f"{headers['webhook-id']}.{ts}.".encode() + body, hashlib.sha256).hexdigest()
    version, _, sig = headers["webhook-signature"].partition(",")
    return version == "v3" and hmac.compare_digest(sig, expected)


def test_sign_matches_receiver_check() -> None:
    body = b'{"id":"abc"}'
    ts = int(time.time())
    headers = {
        "webhook-id": "abc",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign("whsec_k3y", "abc", ts, body),
    }
    assert verify("whsec_k3y", headers, body)
    assert not verify("whsec_other", headers, body)
    assert not verify("whsec_k3y", headers, body + b" ")


def test_backoff_grows_and_is_capped() -> None:
    assert backoff_s(1) < backoff_s(3) < backoff_s(6)
    assert 1.6 <= backoff_s(1) <= 2.4 and 3.2 <= backoff_s(2) <= 4.8  # 2 s, then 4 s, jittered by 20 %
    assert backoff_s(50) <= 600 * 1.2


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 500 if len(receiver.calls) <= receiver.fail_first else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def wait_calls(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.calls) >= n, f"{len(self.calls)} webhook calls, wanted {n}"


@pytest.fixture
def receiver() -> Any:
    rec = Receiver()
    yield rec
    rec.httpd.shutdown()


def _secret(client: Any) -> str:
    r = client.get("/api/v3/webhook/secret", headers=KEY1)
    assert r.status_code == 200 and r.json()["code"] == 200
    secret: str = r.json()["data"]["secret"]
    assert secret.startswith("whsec_")
    assert client.get("/api/v3/webhook/secret").status_code == 401
    return secret


def submit(client: Any, body: dict[str, Any], hook: str) -> str:
    r = client.post(MODEL_URL, json=body, headers=KEY1, params={"webhook": hook})
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["id"])


def test_webhook_delivery_completed(stack: Any, receiver: Receiver) -> None:
    secret = _secret(stack)
    body = {"prompt": "hooked", "image": data_uri(png_bytes()), "size": "256*256", "seed": 3}
    pid = submit(stack, body, receiver.url)
    receiver.wait_calls(1)
    headers, raw = receiver.calls[0]
    assert verify(secret, headers, raw)
    assert headers["webhook-id"] == pid
    payload = json.loads(raw)
    # The bare prediction object, with the input echoed (no code/message/data envelope).
    assert "code" not in payload and "data" not in payload
    assert payload["id"] == pid and payload["status"] == "completed"
    assert payload["model"] == "wavespeed-ai/qwen-image/edit"
    assert payload["input"]["prompt"] == "hooked" and payload["input"]["seed"] == 3
    assert payload["input"]["image"].startswith("http://testserver/files/inputs/")  # inline bytes became a link
    assert len(payload["outputs"]) == 1 and stack.get(payload["outputs"][0]).status_code == 200
    assert payload["urls"]["get"].endswith(f"/api/v3/predictions/{pid}/result")
    assert set(payload) >= {
        "id",
        "model",
        "input",
        "outputs",
        "urls",
        "has_nsfw_contents",
        "status",
        "created_at",
        "error",
    }


def test_webhook_delivery_failed_job(stack: Any, receiver: Receiver) -> None:
    pid = submit(stack, {"prompt": "raise", "image": data_uri(png_bytes()), "size": "256*256"}, receiver.url)
    receiver.wait_calls(1)
    payload = json.loads(receiver.calls[0][1])
    assert payload["id"] == pid and payload["status"] == "failed" and payload["error"]


@pytest.mark.parametrize("app_settings", [{"webhook_first_retry_s": 0.1}], indirect=True)
def test_webhook_retried_after_receiver_errors(stack: Any, app_settings: Any) -> None:
    rec = Receiver(fail_first=2)
    store = JobStore.open(app_settings)
    try:
        pid = submit(stack, {"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256"}, rec.url)
        rec.wait_calls(3, timeout=60)  # two 500s, then delivered (backoff ~0.1 s, ~0.2 s)
        assert {h["webhook-id"] for h, _ in rec.calls} == {pid}  # the same message, retried
        # Recorded as delivered: the outbox never hands that row out again.
        state = wait_for(lambda: (st := store.outbox.state(pid)) and st["delivered_at"] and st, what="delivered")
        assert state["attempts"] == 3 and len(rec.calls) == 3
    finally:
        store.close()
        rec.httpd.shutdown()


def test_webhook_must_be_http(api: Any) -> None:
    r = api.post(
        MODEL_URL,
        json={"prompt": "x", "image": data_uri(png_bytes())},
        headers=KEY1,
        params={"webhook": "file:///etc/passwd"},
    )
    assert r.status_code == 400


def _finished_job_with_webhook(store: JobStore, url: str) -> str:
    """A finished job whose webhook sits in the outbox, written straight into the store (as a URL
    accepted by an older release, or inserted by hand, would be)."""
    from benchmarks.jobs import store_job

    # A variant no worker claims: this test's own.
    job = store_job(variant="poison", base_url="http://testserver", steps=1, webhook_url=url)
    store.create(job)
    claimed = store.claim("test", ["poison"], 30)
    assert claimed is not None and claimed.lease_token and store.complete(job.id, claimed.lease_token, [], 1)
    return job.id


@pytest.mark.parametrize("poison", ["http://0177.0.0.1:9/x", "http://exa mple.com/", "http://[::1/x", "not a url"])
def test_a_poison_row_never_stops_other_deliveries_before_or_after_a_restart(
    app_settings: Any, fake_runner: Any, receiver: Receiver, poison: str
) -> None:
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from tests.support import ThreadWorker

    store = JobStore.open(app_settings)
    store.migrate()
    bad = _finished_job_with_webhook(store, poison)
    body = {"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256"}
    try:
        for life in range(2):  # the server's first life, then a restart on the same store
            with TestClient(create_app(app_settings)) as client:
                worker = ThreadWorker(app_settings, fake_runner).start()
                try:
                    pid = submit(client, body, receiver.url)
                    wait_for(lambda pid=pid: any(h["webhook-id"] == pid for h, _ in receiver.calls), what="delivery")
                finally:
                    worker.stop()
            state = store.outbox.state(bad)
            assert state is not None and state["attempts"] >= 1 and state["last_error"], (life, state)
            assert state["delivered_at"] is None
    finally:
        store.close()
