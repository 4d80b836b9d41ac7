"""ASGI middleware: what a trusted reverse proxy says about the original request.

From peers in ``forwarded_allow_ips`` only: ``X-Forwarded-Proto`` becomes the scheme,
``X-Forwarded-Host`` the Host header (so links are built on the name the client called: the proxy of
vendor-host mode, an ingress that rewrites Host), ``X-Forwarded-For`` the client address. From
anyone else the headers are ignored. Uvicorn's own proxy-header handling is off (``serve``): it reads
no X-Forwarded-Host, and in-process apps get the same behaviour as served ones this way.
"""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    def __init__(self, spec: str) -> None:
        entries = [e.strip() for e in spec.split(",") if e.strip()]
        self.any = "*" in entries
        self.networks: list[Network] = [ipaddress.ip_network(e, strict=False) for e in entries if e != "*"]

    def __contains__(self, address: str | None) -> bool:
        if self.any:
            return True
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:  # a unix socket, a test client's name
            return False
        return any(ip in net for net in self.networks)


def _first(value: bytes) -> str:
    return value.decode("latin-1").split(",")[0].strip()


class ProxyHeaders:
    def __init__(self, app: ASGIApp, trusted: str) -> None:
        self.app = app
        self.trusted = TrustedProxies(trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and (scope.get("client") or (None,))[0] in self.trusted:
            # In place, as uvicorn's own middleware does: its access log then names the real client.
            headers = dict(scope["headers"])
            proto = _first(headers.get(b"x-forwarded-proto", b"")).lower()
            if proto in ("http", "https"):
                scope["scheme"] = proto if scope["type"] == "http" else {"http": "ws", "https": "wss"}[proto]
            host = _first(headers.get(b"x-forwarded-host", b""))
            if host:
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", host.encode())]
            forwarded_for = [h.strip() for h in headers.get(b"x-forwarded-for", b"").decode("latin-1").split(",")]
            # The nearest address that is not one of our proxies is the client's.
            for address in reversed([h for h in forwarded_for if h]):
                if address not in self.trusted:
                    scope["client"] = (address, 0)
                    break
        await self.app(scope, receive, send)
