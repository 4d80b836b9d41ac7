"""Worker side: bytes from outside, through the SSRF guard. An ``ImageRef`` becomes an RGB image (from
storage, or over http(s)); a LoRA URL becomes a file on disk (server/media/loras.py).

Every request goes through ``guarded_get``: redirects are followed by hand and each hop is checked
again (the connection itself is checked too, see netguard.py), credentials never follow a redirect
to another host, connect and read time out, and the body is capped while it streams.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import BinaryIO

import httpx
from PIL import Image

from server.errors import MediaError
from server.jobs.contract import ImageRef
from server.media.images import ImageLimits, decode_image
from server.media.netguard import BlockedDestination, NetGuard, guarded_client
from server.storage.base import Storage

MAX_REDIRECTS = 5


@contextlib.contextmanager
def guarded_get(
    url: str,
    *,
    what: str,
    timeout_s: float,
    guard: NetGuard,
    headers: dict[str, str] | None = None,
    client: httpx.Client | None = None,
) -> Iterator[httpx.Response]:
    """The final 200 response of ``GET url``, streaming; anything else is a MediaError naming ``what``."""
    own = client is None
    client = client or guarded_client(guard)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    current = url
    origin = httpx.URL(url).netloc if headers else b""
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            guard.check_url(current)
            sent = headers if headers and httpx.URL(current).netloc == origin else None
            with client.stream("GET", current, timeout=timeout, headers=sent) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    current = str(resp.url.join(resp.headers["location"]))
                    continue
                if resp.status_code != 200:
                    raise MediaError(f"fetching the {what} failed: HTTP {resp.status_code} from {url}")
                yield resp
                return
        raise MediaError(f"fetching the {what} failed: more than {MAX_REDIRECTS} redirects from {url}")
    except BlockedDestination as exc:
        raise MediaError(f"fetching the {what} was refused: {exc}") from exc
    except (ValueError, httpx.InvalidURL) as exc:  # a malformed URL (from a redirect's Location, say)
        raise MediaError(f"fetching the {what} failed: bad URL: {exc}") from exc
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching the {what} failed: {type(exc).__name__}: {exc or url}") from exc
    finally:
        if own:
            client.close()


def copy_capped(resp: httpx.Response, sink: BinaryIO, *, what: str, url: str, max_bytes: int) -> int:
    """Stream the body into ``sink``, refusing more than ``max_bytes`` (declared or actual)."""
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"the {what} at {url} is {declared} bytes; the limit is {max_bytes}")
    size = 0
    for chunk in resp.iter_bytes(1 << 20):
        size += len(chunk)
        if size > max_bytes:
            raise MediaError(f"the {what} at {url} is larger than the limit of {max_bytes} bytes")
        sink.write(chunk)
    return size


def fetch_url(
    url: str, *, timeout_s: float, max_bytes: int, guard: NetGuard | None = None, client: httpx.Client | None = None
) -> bytes:
    """GET an image over http(s), guarded, into memory."""
    buf = io.BytesIO()
    with guarded_get(url, what="image", timeout_s=timeout_s, guard=guard or NetGuard(), client=client) as resp:
        copy_capped(resp, buf, what="image", url=url, max_bytes=max_bytes)
    return buf.getvalue()


def load_reference(
    ref: ImageRef, *, storage: Storage, limits: ImageLimits, fetch_timeout_s: float, guard: NetGuard | None = None
) -> Image.Image:
    """A job's image reference to an RGB image (MediaError / InvalidInput fail the job)."""
    if ref.key is not None:
        try:
            data = storage.get(ref.key)
        except FileNotFoundError as exc:
            raise MediaError(f"the input image {ref.key} is no longer stored on this server") from exc
    else:
        assert ref.url is not None
        data = fetch_url(ref.url, timeout_s=fetch_timeout_s, max_bytes=limits.max_bytes, guard=guard)
    # A stored key was probed when it was stored (submit, upload; an output is ours): not again.
    # Anything fetched is probed here, once, by decode_image.
    return decode_image(data, limits, probed=ref.key is not None and ref.key.startswith(("inputs/", "uploads/")))
