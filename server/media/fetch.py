"""Worker side: an ``ImageRef`` becomes an RGB image, from storage or over http(s) through the
SSRF guard (redirects followed by hand and re-checked at every hop, timeouts, a size cap)."""

from __future__ import annotations

import httpx
from PIL import Image

from server.errors import InvalidInput, MediaError
from server.jobs.contract import ImageRef
from server.media.images import ImageLimits, decode_image, probe_image
from server.media.netguard import BlockedDestination, NetGuard, guarded_client
from server.storage.base import Storage

MAX_REDIRECTS = 5


def fetch_url(
    url: str, *, timeout_s: float, max_bytes: int, guard: NetGuard | None = None, client: httpx.Client | None = None
) -> bytes:
    """GET a file over http(s), guarded: see server/media/netguard.py."""
    guard = guard or NetGuard()
    own = client is None
    client = client or guarded_client(guard)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    current = url
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            guard.check_url(current)
            with client.stream("GET", current, timeout=timeout) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    current = str(resp.url.join(resp.headers["location"]))
                    continue
                return _read_capped(resp, url, max_bytes)
        raise MediaError(f"fetching the image failed: more than {MAX_REDIRECTS} redirects from {url}")
    except BlockedDestination as exc:
        raise MediaError(f"fetching the image was refused: {exc}") from exc
    except ValueError as exc:  # a malformed URL (from a redirect's Location, say)
        raise MediaError(f"fetching the image failed: bad URL: {exc}") from exc
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching the image failed: {type(exc).__name__}: {exc or url}") from exc
    finally:
        if own:
            client.close()


def _read_capped(resp: httpx.Response, url: str, max_bytes: int) -> bytes:
    if resp.status_code != 200:
        raise MediaError(f"fetching the image failed: HTTP {resp.status_code} from {url}")
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"the image at {url} is {declared} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise MediaError(f"the image at {url} is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
    try:
        probe_image(data, limits)
    except ValueError as exc:
        raise InvalidInput(f"the input image is not usable: {exc}") from exc
    return decode_image(data, limits)
