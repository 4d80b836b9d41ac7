"""The SSRF guard and the guarded image fetcher, against real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from server.errors import MediaError
from server.media.fetch import fetch_url
from server.media.netguard import (
    BlockedDestination,
    NetGuard,
    _GuardedSyncBackend,
    forbidden_reason,
    guarded_async_client,
)
from tests.support import png_bytes

PNG = png_bytes()


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        status, body, headers = self.routes.get(self.path, (404, b"nope", {}))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.do_GET()

    def log_message(self, *args: Any) -> None:
        pass


def _serve(host: str) -> tuple[ThreadingHTTPServer, dict[str, tuple[int, bytes, dict[str, str]]], list[str]]:
    routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
    hits: list[str] = []
    handler = type("H", (_Handler,), {"routes": routes, "hits": hits})
    httpd = ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, routes, hits


@pytest.fixture
def hosts() -> Iterator[dict[str, Any]]:
    """An image host on 127.0.0.1 and a redirector on 127.0.0.2 (both loopback, both private)."""
    target, troutes, thits = _serve("127.0.0.1")
    redirector, rroutes, _ = _serve("127.0.0.2")
    target_url = f"http://127.0.0.1:{target.server_address[1]}"
    redirect_url = f"http://127.0.0.2:{redirector.server_address[1]}"
    troutes["/img.png"] = (200, PNG, {"Content-Type": "image/png"})
    rroutes["/to-target"] = (302, b"", {"Location": target_url + "/img.png"})
    rroutes["/local"] = (200, PNG, {"Content-Type": "image/png"})
    rroutes["/loop"] = (302, b"", {"Location": "/loop"})
    rroutes["/to-file"] = (302, b"", {"Location": "file:///etc/passwd"})
    rroutes["/to-octal"] = (302, b"", {"Location": "http://0177.0.0.1/x"})
    rroutes["/to-unparsable"] = (302, b"", {"Location": "http://[::1/x"})
    yield {"target": target_url, "redirector": redirect_url, "target_hits": thits}
    target.shutdown()
    redirector.shutdown()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.100.100.200",
        "168.63.129.16",
        "fd00:ec2::254",
        "fe80::1",
        "224.0.0.1",
        "ff02::1",
        "0.0.0.0",
        "240.0.0.1",
        "100.64.0.1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::",  # 6to4 wrapping 127.0.0.1
    ],
)
def test_forbidden_addresses(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/x.png",
        "gopher://example.com/",
        "http://localhost/x.png",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8000/",
        "http://2130706433/",  # 127.0.0.1 as a number: resolves to loopback, refused at connect time
    ],
)
def test_fetch_refuses_dangerous_urls(url: str) -> None:
    with pytest.raises(MediaError, match=r"refused|only http"):
        fetch_url(url, timeout_s=3, max_bytes=10_000_000)


def test_loopback_server_refused_unless_allowed(hosts: dict[str, Any]) -> None:
    url = hosts["target"] + "/img.png"
    with pytest.raises(MediaError, match=r"127\.0\.0\.1.*loopback"):
        fetch_url(url, timeout_s=3, max_bytes=10_000_000)
    assert hosts["target_hits"] == []  # not even connected to
    allowed = NetGuard.from_entries(["127.0.0.0/8"])
    assert fetch_url(url, timeout_s=3, max_bytes=10_000_000, guard=allowed) == PNG


def test_redirect_hops_are_checked(hosts: dict[str, Any]) -> None:
    only_redirector = NetGuard.from_entries(["127.0.0.2/32"])
    assert fetch_url(hosts["redirector"] + "/local", timeout_s=3, max_bytes=10**7, guard=only_redirector) == PNG
    with pytest.raises(MediaError, match=r"refused.*127\.0\.0\.1"):
        fetch_url(hosts["redirector"] + "/to-target", timeout_s=3, max_bytes=10**7, guard=only_redirector)
    assert hosts["target_hits"] == []
    with pytest.raises(MediaError, match="only http"):
        fetch_url(hosts["redirector"] + "/to-file", timeout_s=3, max_bytes=10**7, guard=only_redirector)
    with pytest.raises(MediaError, match="redirects"):
        fetch_url(hosts["redirector"] + "/loop", timeout_s=3, max_bytes=10**7, guard=only_redirector)
    both = NetGuard.from_entries(["127.0.0.1", "127.0.0.2"])
    assert fetch_url(hosts["redirector"] + "/to-target", timeout_s=3, max_bytes=10**7, guard=both) == PNG


def test_host_name_allow_list(hosts: dict[str, Any]) -> None:
    port = hosts["target"].rsplit(":", 1)[1]
    guard = NetGuard.from_entries(["localhost"])
    assert fetch_url(f"http://localhost:{port}/img.png", timeout_s=3, max_bytes=10**7, guard=guard) == PNG


def test_size_cap_while_streaming(hosts: dict[str, Any]) -> None:
    allowed = NetGuard.from_entries(["127.0.0.0/8"])
    with pytest.raises(MediaError, match="limit"):
        fetch_url(hosts["target"] + "/img.png", timeout_s=3, max_bytes=100, guard=allowed)


def test_backend_checks_the_resolved_address_and_pins_it(hosts: dict[str, Any]) -> None:
    # A name is resolved once, by the guard; the connection goes to the address it checked.
    port = int(hosts["target"].rsplit(":", 1)[1])
    with pytest.raises(BlockedDestination, match="loopback"):
        _GuardedSyncBackend(NetGuard()).connect_tcp("localhost", port, timeout=3)
    stream = _GuardedSyncBackend(NetGuard.from_entries(["127.0.0.1/32"])).connect_tcp("localhost", port, timeout=3)
    try:
        assert stream.get_extra_info("server_addr")[0] == "127.0.0.1"
    finally:
        stream.close()


def test_async_client_for_webhooks_is_guarded(hosts: dict[str, Any]) -> None:
    async def post(guard: NetGuard) -> int:
        async with guarded_async_client(guard, timeout=3) as client:
            return (await client.post(hosts["target"] + "/img.png", content=b"{}")).status_code

    with pytest.raises(BlockedDestination):
        asyncio.run(post(NetGuard()))
    assert hosts["target_hits"] == []
    assert asyncio.run(post(NetGuard.from_entries(["127.0.0.0/8"]))) == 200


def test_env_proxies_are_ignored(hosts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.2:9")  # would bypass the guard if honoured
    allowed = NetGuard.from_entries(["127.0.0.1/32"])
    assert fetch_url(hosts["target"] + "/img.png", timeout_s=3, max_bytes=10**7, guard=allowed) == PNG


def test_redirects_to_unparsable_or_ambiguous_hosts_are_media_errors(hosts: dict[str, Any]) -> None:
    """A redirect's Location is checked like the URL itself: a host httpx cannot parse, or an octal
    one, fails the fetch as a media error (1402), never as a crash."""
    guard = NetGuard.from_entries(["127.0.0.0/8"])
    for path in ("/to-octal", "/to-unparsable"):
        with pytest.raises(MediaError):
            fetch_url(hosts["redirector"] + path, timeout_s=5, max_bytes=10**6, guard=guard)
