"""Webhook signing (unit) and delivery end to end, verified the way API.md tells receivers to."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from server.webhooks import backoff_s, sign
from tests.conftest import ServerProc, data_uri, png_bytes


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
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
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


def _secret(server: ServerProc) -> str:
    r = httpx.get(server.url + "/api/v3/webhook/secret", headers=server.headers)
    assert r.status_code == 200 and r.json()["code"] == 200
    secret: str = r.json()["data"]["secret"]
    assert secret.startswith("whsec_")
    assert httpx.get(server.url + "/api/v3/webhook/secret").status_code == 401
    return secret


def test_webhook_delivery_completed(server: ServerProc, receiver: Receiver) -> None:
    secret = _secret(server)
    body = {"prompt": "hooked", "image": data_uri(png_bytes()), "size": "256*256", "seed": 3}
    r = server.submit(body, params={"webhook": receiver.url})
    pid = r.json()["data"]["id"]
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
    assert payload["input"]["image"].startswith(server.url + "/files/inputs/")  # inline bytes became a link
    assert len(payload["outputs"]) == 1 and httpx.get(payload["outputs"][0]).status_code == 200
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


def test_webhook_delivery_failed_job(server: ServerProc, receiver: Receiver, image_host: tuple) -> None:
    host, _ = image_host
    r = server.submit({"prompt": "x", "image": f"{host}/gone.png"}, params={"webhook": receiver.url})
    receiver.wait_calls(1)
    payload = json.loads(receiver.calls[0][1])
    assert payload["id"] == r.json()["data"]["id"] and payload["status"] == "failed" and payload["error"]


def test_webhook_retried_after_receiver_errors(server: ServerProc) -> None:
    rec = Receiver(fail_first=2)
    try:
        server.submit({"prompt": "x", "image": data_uri(png_bytes()), "size": "256*256"}, params={"webhook": rec.url})
        rec.wait_calls(3, timeout=60)  # two 500s, then delivered (backoff ~2 s, ~4 s)
        ids = {h["webhook-id"] for h, _ in rec.calls}
        assert len(ids) == 1  # the same message, retried
        time.sleep(1.5)
        assert len(rec.calls) == 3  # not delivered again after success
    finally:
        rec.httpd.shutdown()


def test_webhook_must_be_http(server: ServerProc) -> None:
    r = server.submit({"prompt": "x", "image": data_uri(png_bytes())}, params={"webhook": "file:///etc/passwd"})
    assert r.status_code == 400
