"""SSRF protection for every outbound request the server makes (image URLs, webhooks).

Clients hand us URLs; fetching them blindly would let anyone reach the machine's loopback services,
the private network or the cloud metadata endpoint. ``NetGuard`` decides which addresses may be
contacted, and ``guarded_client``/``guarded_async_client`` build httpx clients whose *network
backend* resolves the host name itself, checks every address, and connects to the checked address
only. The check and the connection use the same resolution, so DNS rebinding (a name that resolves
to a public address when checked and a private one when connected) cannot slip through; TLS still
verifies the certificate against the original host name. Every new connection goes through the
check, so each redirect hop is checked as well. Proxies from the environment are ignored (a proxy
would connect on our behalf, unchecked).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata services. Most are link-local (refused anyway); some are ordinary-looking addresses.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server
        "fd00:ec2::254",  # AWS IPv6
    )
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"})


class BlockedDestination(Exception):
    """The URL points somewhere this server must not connect to."""


class InvalidURL(ValueError):
    """The URL does not parse (as httpx, which sends it, parses it)."""


# Labels of digits, octal (leading 0) or hex (0x…): what inet_aton would read as an IPv4 address.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*$")
_HOST_CHARS = re.compile(r"^[a-z0-9.\-_]+$|^[0-9a-f:.]+$")


def parse_url(url: str) -> httpx.URL:
    """``url`` as httpx parses it, or ``InvalidURL``; the host must be plain DNS letters, digits,
    dots and hyphens after IDNA (no percent-escapes, no NULs) or a bracketed IPv6 literal."""
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise InvalidURL(str(exc) or "malformed URL") from None
    if port is not None and not 0 < port < 65536:
        raise InvalidURL(f"invalid port {port}")
    host = parsed.raw_host.decode("ascii", "replace").lower()  # IDNA-encoded (xn--...)
    if host and not _HOST_CHARS.match(host):
        raise InvalidURL(f"invalid host {host!r}")
    return parsed


def _unwrap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be contacted (None: a public unicast address)."""
    ip = _unwrap(ip)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    )
    for name, hit in checks:
        if hit:
            return f"a {name} address"
    return None


@dataclass(frozen=True)
class NetGuard:
    """Allow public unicast addresses; allow-listed networks and host names on top (on-prem use)."""

    allow_networks: tuple[IPNetwork, ...] = ()
    allow_hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> NetGuard:
        """Entries are CIDRs / addresses (``10.0.0.0/8``) or host names (``images.lan``, ``*.corp``)."""
        nets: list[IPNetwork] = []
        hosts: set[str] = set()
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(tuple(nets), frozenset(hosts))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.allow_hosts)

    def address_allowed(self, ip: IPAddress) -> bool:
        return any(_unwrap(ip) in net or ip in net for net in self.allow_networks)

    def check_url(self, url: str) -> httpx.URL:
        """Cheap checks that need no DNS, on the URL exactly as httpx will send it: http(s) only, a
        well-formed host (an unparsable one raises ``InvalidURL``), no numeric host in any form but
        the canonical one (``0177.0.0.1``, ``2130706433``, ``0x7f.1`` and ``127.1`` all mean
        127.0.0.1 to the resolver), and no literal or well-known forbidden host."""
        parsed = parse_url(url)
        if parsed.scheme not in ("http", "https"):
            raise BlockedDestination(f"only http and https URLs are fetched, not {parsed.scheme or 'no scheme'!r}")
        host = parsed.raw_host.decode("ascii", "replace").lower().rstrip(".")
        if not host:
            raise BlockedDestination("the URL has no host")
        if self.host_allowed(host):
            return parsed
        if host in METADATA_HOSTS:
            raise BlockedDestination(f"{host} is a cloud metadata host")
        if host == "localhost" or host.endswith(".localhost"):
            self.check_address(host, ipaddress.ip_address("127.0.0.1"))
            return parsed
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if _NUMERIC_HOST.match(host):
                raise BlockedDestination(
                    f"{host} is a numeric host in a non-standard form; write the address as a.b.c.d"
                ) from None
            return parsed
        self.check_address(host, ip)
        return parsed

    def check_address(self, host: str, ip: IPAddress) -> None:
        if self.host_allowed(host) or self.address_allowed(ip):
            return
        reason = forbidden_reason(ip)
        if reason:
            raise BlockedDestination(f"{host} resolves to {ip}, {reason}; refused (see QWEN_EDIT_FETCH_ALLOW)")

    def pick(self, host: str, infos: Iterable[tuple[typing.Any, ...]]) -> list[str]:
        """From getaddrinfo results, the addresses we may connect to; raises when there are none."""
        allowed: list[str] = []
        refusal: BlockedDestination | None = None
        for info in infos:
            addr = str(info[4][0]).split("%", 1)[0]
            try:
                self.check_address(host, ipaddress.ip_address(addr))
            except BlockedDestination as exc:
                refusal = refusal or exc
                continue
            if addr not in allowed:
                allowed.append(addr)
        if not allowed:
            raise refusal or BlockedDestination(f"{host} did not resolve to any address")
        return allowed


class _GuardedSyncBackend(httpcore.SyncBackend):
    def __init__(self, guard: NetGuard) -> None:
        self.guard = guard

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"could not resolve {host}: {exc}") from exc
        addresses = self.guard.pick(host, infos)
        last: Exception | None = None
        for addr in addresses:  # connect to the checked address, never to the name again
            try:
                return super().connect_tcp(addr, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last


class _GuardedAsyncBackend(httpcore.AnyIOBackend):
    def __init__(self, guard: NetGuard) -> None:
        self.guard = guard

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"could not resolve {host}: {exc}") from exc
        addresses = self.guard.pick(host, infos)
        last: Exception | None = None
        for addr in addresses:
            try:
                return await super().connect_tcp(addr, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport, with its connection pool built on the guarded network backend."""

    def __init__(self, guard: NetGuard) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False), network_backend=_GuardedSyncBackend(guard)
        )


class GuardedAsyncTransport(httpx.AsyncHTTPTransport):
    def __init__(self, guard: NetGuard) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False), network_backend=_GuardedAsyncBackend(guard)
        )


def guarded_client(guard: NetGuard, **kwargs: typing.Any) -> httpx.Client:
    """A client that never follows redirects itself (callers check each hop) and never uses proxies."""
    return httpx.Client(transport=GuardedTransport(guard), follow_redirects=False, trust_env=False, **kwargs)


def guarded_async_client(guard: NetGuard, **kwargs: typing.Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=GuardedAsyncTransport(guard), follow_redirects=False, trust_env=False, **kwargs)
