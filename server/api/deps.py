"""What the routes share: the services built at start-up, and the FastAPI dependencies that hand
them out (``services``, ``caller``) with the request's own base URL."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipelines.registry import endpoints_of, get_variant
from server.api.account import Account
from server.api.auth import Authenticator, Caller
from server.api.limits import RateLimiter
from server.jobs.store import JobStore
from server.settings import Settings
from server.storage.base import Storage

if TYPE_CHECKING:
    from server.api.render import Renderer
    from server.api.tasks.waiter import CompletionWaiter
    from server.api.uploads import UploadSigner


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: Storage
    auth: Authenticator
    waiter: CompletionWaiter
    upload_signer: UploadSigner
    renderer: Renderer
    webhook_secret: str
    variants: list[str] = field(default_factory=list)
    rate_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))  # per-key submits/minute
    account: Account = field(init=False)  # prices, budgets, spending (api/account.py)

    def __post_init__(self) -> None:
        self.account = Account(self.settings, self.store)

    def served_models(self) -> str:
        return ", ".join(m for v in self.variants for m in endpoints_of(get_variant(v)))

    def own_origins(self, request: Request) -> set[str]:
        """scheme://host[:port] under which clients reach this server (to recognise our own links)."""
        bases = {
            str(request.base_url),
            *self.settings.public_urls,
            *(f"https://{h}" for h in self.settings.vendor_hosts),
        }
        if self.settings.public_url:
            bases.add(self.settings.public_url)
        return {f"{p.scheme}://{p.netloc}".lower() for p in map(urlsplit, bases)}


# Both dependencies are ``async`` although they never await: FastAPI runs a plain ``def`` dependency
# in the thread pool, and two thread hops a request were a third of a result poll's time.
async def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


# Declared so that /openapi.json states the scheme; the check itself (and its 401) is Authenticator's.
_bearer = HTTPBearer(auto_error=False, description="An API key of this server (QWEN_EDIT_API_KEYS).")


async def caller(request: Request, _: HTTPAuthorizationCredentials | None = Security(_bearer)) -> Caller:
    """FastAPI dependency: authenticate the request (no I/O), return the caller."""
    svc: Services = request.app.state.services
    return svc.auth(request)


def base_url(request: Request, settings: Settings) -> str:
    """Where clients reach us: a vendor host's https name for a request that came for one (the
    proxy of vendor-host mode terminates TLS for it), else the configured public URL, else what
    this request was sent to (its Host, or X-Forwarded-Host/-Proto from a trusted proxy)."""
    host = (request.url.hostname or "").lower()
    if host in settings.vendor_hosts:
        return f"https://{request.url.netloc}"
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")
