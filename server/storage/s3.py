"""S3-compatible object storage (AWS S3, MinIO, ...) behind the same interface as LocalStorage."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from server.storage.base import MAX_KEY_BYTES, StorageError, content_type_of, valid_key

_MISSING = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix/``); the prefix may be empty."""
    parts = urlparse(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3Storage:
    def __init__(
        self, url: str, *, endpoint_url: str | None = None, region: str | None = None, client: Any = None
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        # Path-style addressing: what MinIO and most S3-compatible servers expect behind a custom endpoint.
        config = Config(
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self._url_base: str | None = None  # scheme://host/[bucket/] of this bucket's object URLs

    def _key(self, key: str) -> str:
        if not valid_key(key) or len((self.prefix + key).encode()) > MAX_KEY_BYTES:
            raise KeyError(key)
        return self.prefix + key

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type or content_type_of(key)
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not write {key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())
        except KeyError as exc:
            raise FileNotFoundError(key) from exc
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                raise FileNotFoundError(key) from exc
            raise StorageError(f"could not read {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"could not read {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except KeyError:
            return False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return False
            raise StorageError(f"could not look up {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"could not look up {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except KeyError:
            return
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not delete {key}: {exc}") from exc

    def local_path(self, key: str) -> Path | None:
        return None  # never on this machine's disk: the API streams it, or hands out a presigned URL

    def key_of_url(self, url: str) -> str | None:
        """The key when ``url`` is one of this bucket's object URLs (a presigned output link
        handed back as an input), else None. Its signature is not needed: we read the object."""
        if self._url_base is None:
            probe = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": "k"}, ExpiresIn=60
            )
            self._url_base = urlsplit(probe)._replace(query="", fragment="").geturl()[: -len("k")]
        bare = urlsplit(url)._replace(query="", fragment="").geturl()
        if not bare.startswith(self._url_base):
            return None
        key = unquote(bare[len(self._url_base) :])
        if not key.startswith(self.prefix):
            return None
        key = key[len(self.prefix) :]
        return key if valid_key(key) else None

    def presigned_url(self, key: str, ttl_s: int) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=ttl_s
        )
        return url
