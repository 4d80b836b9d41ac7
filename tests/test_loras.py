"""LoRA references (server/media/loras.py): the SSRF guard, size caps and folder limits apply to them
as to images. Checked at submit through the app in process, and fetched by the worker side against
real HTTP servers on loopback; the pipeline only ever gets a local file."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from server.errors import InvalidInput, MediaError
from server.media.loras import LoraFiles, check_safetensors
from server.media.netguard import NetGuard
from tests.support import KEY1, data_uri, png_bytes, settings_for

LORA_URL = "/api/v3/wavespeed-ai/qwen-image/edit-lora"


def safetensors_bytes(payload: int = 64) -> bytes:
    header = b'{"__metadata__":{"format":"pt"}}'
    return struct.pack("<Q", len(header)) + header + b"\0" * payload


class Files(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
    hits: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        self.hits.append((self.path, self.headers.get("authorization")))
        status, body, headers = self.routes.get(self.path, (404, b"nope", {}))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def host() -> Iterator[tuple[str, type[Files]]]:
    handler = type("H", (Files,), {"routes": {}, "hits": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()


def submit(client: Any, path: str) -> Any:
    body = {"prompt": "x", "image": data_uri(png_bytes()), "loras": [{"path": path, "scale": 1.0}]}
    return client.post(LORA_URL, json=body, headers=KEY1)


# --- at submit ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.safetensors",
        "http://[::1]:9/x.safetensors",
        "http://0177.0.0.1/x.safetensors",
        "http://2130706433/x.safetensors",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost/x.safetensors",
        "file:///etc/passwd",
        "http://10.0.0.1/x.safetensors",
    ],
)
@pytest.mark.parametrize("app_settings", [{"fetch_allow": []}], indirect=True)  # loopback is not allowed here
def test_lora_urls_are_checked_by_the_guard_at_submit(api: Any, url: str) -> None:
    r = submit(api, url)
    assert r.status_code == 400, r.text
    assert r.json()["message"].startswith("loras[0].path")


def test_local_paths_outside_the_lora_folders_get_one_and_the_same_answer(api: Any, app_settings: Any) -> None:
    folder = app_settings.resolved_lora_dirs[0]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.safetensors").write_bytes(safetensors_bytes())
    db = str(app_settings.data_dir / "jobs.db")
    answers = {
        path: submit(api, path).json()["message"].replace(path[:200], "<path>")
        for path in (
            "/etc/shadow",
            db,
            "/etc/does-not-exist",
            "../jobs.db",
            "sub/../../x.safetensors",
            "nope.safetensors",
        )
    }
    assert len(set(answers.values())) == 1, answers  # the answer says nothing of what exists
    assert "is not one this server offers" in next(iter(answers.values()))
    assert submit(api, "mine.safetensors").status_code == 200  # inside the folder: fine


def test_hub_files_only_where_allowed(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from server.api.app import create_app

    for allowed in (False, True):
        with TestClient(create_app(settings_for(tmp_path / f"hub{allowed}", lora_hub=allowed))) as client:
            r = submit(client, "lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V1.1.safetensors")
            assert r.status_code == (200 if allowed else 400), r.text


# --- at the worker --------------------------------------------------------------------------------


def test_a_lora_url_is_fetched_through_the_guard_into_a_bounded_cache(
    tmp_path: Path, host: tuple[str, type[Files]]
) -> None:
    base, handler = host
    handler.routes["/a.safetensors"] = (200, safetensors_bytes(1000), {})
    handler.routes["/b.safetensors"] = (200, safetensors_bytes(1000), {})
    handler.routes["/moved"] = (302, b"", {"Location": "/a.safetensors"})
    settings = settings_for(tmp_path, lora_cache_bytes=1500)
    files = LoraFiles(settings, NetGuard.from_entries(["127.0.0.0/8"]))

    first = files.local_file(base + "/a.safetensors")
    assert first.is_file() and first.parent == tmp_path / "lora-cache"
    assert files.local_file(base + "/a.safetensors") == first  # cached: fetched once
    assert [p for p, _ in handler.hits] == ["/a.safetensors"]
    second = files.local_file(base + "/b.safetensors")  # the cache holds one: the older goes
    assert second.is_file() and not first.exists()
    assert files.local_file(base + "/moved").is_file()  # redirects followed, each hop checked

    # Without the allow-list loopback is refused: at the first hop, and at a redirect's.
    with pytest.raises(MediaError, match="refused"):
        LoraFiles(settings, NetGuard()).local_file(base + "/c.safetensors")


def test_size_cap_and_file_format_are_enforced(tmp_path: Path, host: tuple[str, type[Files]]) -> None:
    base, handler = host
    handler.routes["/big.safetensors"] = (200, safetensors_bytes(5000), {})
    handler.routes["/html"] = (200, b"<html>hello</html>" * 10, {})
    files = LoraFiles(settings_for(tmp_path, lora_max_bytes=2000), NetGuard.from_entries(["127.0.0.0/8"]))
    with pytest.raises(MediaError, match=r"is 5040 bytes; the limit is 2000"):  # the declared length
        files.local_file(base + "/big.safetensors")
    with pytest.raises(InvalidInput, match="not a safetensors file"):
        files.local_file(base + "/html")
    assert not any(p.name.startswith(".part") or p.suffix for p in (tmp_path / "lora-cache").iterdir())


def test_local_files_only_inside_the_folders_and_anything_for_the_operator(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    folder = settings.resolved_lora_dirs[0]
    folder.mkdir(parents=True)
    (folder / "style.safetensors").write_bytes(safetensors_bytes())
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(safetensors_bytes())
    files = LoraFiles(settings, NetGuard())
    assert files.local_file("style.safetensors") == folder / "style.safetensors"
    for path in (str(outside), "../outside.safetensors", "/etc/passwd"):
        with pytest.raises(InvalidInput, match="is not one this server offers"):
            files.local_file(path)
    assert files.local_file(str(outside), trusted=True) == outside  # QWEN_EDIT_LIGHTNING_LORA


def test_hub_files_come_from_the_hub_endpoint_with_the_token(
    tmp_path: Path, host: tuple[str, type[Files]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, handler = host
    handler.routes["/owner/repo/resolve/main/dir/x.safetensors"] = (302, b"", {"Location": "/cdn/x"})
    handler.routes["/cdn/x"] = (200, safetensors_bytes(), {})
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", base)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    files = LoraFiles(settings_for(tmp_path, lora_hub=True), NetGuard.from_entries(["127.0.0.0/8"]))
    assert files.local_file("owner/repo/dir/x.safetensors").is_file()
    assert handler.hits[0] == ("/owner/repo/resolve/main/dir/x.safetensors", "Bearer hf_secret")
    with pytest.raises(InvalidInput):  # not allowed for clients where the setting is off
        LoraFiles(settings_for(tmp_path / "off"), NetGuard()).local_file("owner/repo/dir/x.safetensors")


def test_check_safetensors_refuses_truncated_headers(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(InvalidInput):
        check_safetensors(bad, "bad")
