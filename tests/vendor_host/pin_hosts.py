"""Imported as ``sitecustomize`` by the client processes of tests/test_vendor_host_e2e.py: the names
in QWEN_EDIT_TEST_PINNED_HOSTS resolve to 127.0.0.1 and the proxy's port, as split DNS or a hosts
entry would make them resolve to the proxy (the clients still connect to port 443 as far as they
know: the URL, the Host header and TLS's server name are the vendor's). Every other name resolves
as usual."""

from __future__ import annotations

import os
import socket

_PINNED = {h.strip().lower() for h in os.environ.get("QWEN_EDIT_TEST_PINNED_HOSTS", "").split(",") if h.strip()}
_PORT = int(os.environ.get("QWEN_EDIT_TEST_PROXY_PORT", "443"))
_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and name.lower().rstrip(".") in _PINNED:
        if str(port) not in ("443", "https"):
            raise socket.gaierror(f"pinned test host {name} is only reachable on port 443, not {port}")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", _PORT))]
    return _real_getaddrinfo(host, port, family, type, proto, flags)


socket.getaddrinfo = _getaddrinfo
