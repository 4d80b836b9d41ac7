"""Pick the storage backend from the settings, and say how clients reach a stored file."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from server.settings import Settings
from server.storage.base import Storage
from server.storage.local import LocalStorage


def build_storage(settings: Settings) -> Storage:
    """LocalStorage under storage_dir (default), or S3Storage for ``storage_url=s3://bucket/prefix``."""
    url = settings.storage_url
    if not url:
        return LocalStorage(settings.resolved_storage_dir)
    if url.startswith("file://"):
        return LocalStorage(Path(urlparse(url).path))
    if url.startswith("s3://"):
        from server.storage.s3 import S3Storage

        return S3Storage(url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    raise ValueError(f"QWEN_EDIT_STORAGE_URL must be s3://bucket[/prefix] (or unset): {url!r}")


def storage_description(settings: Settings) -> str:
    return settings.storage_url or str(settings.resolved_storage_dir)


def file_url(storage: Storage, settings: Settings, base: str, key: str) -> str:
    """A client's link to a stored file: through this API (default) or presigned by the object store."""
    presign = getattr(storage, "presigned_url", None)
    if settings.storage_presign and presign is not None:
        return str(presign(key, settings.storage_presign_ttl_s))
    return f"{base}/files/{key}"
