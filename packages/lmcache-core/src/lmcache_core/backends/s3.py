"""The S3 tier (``remote_url: s3://bucket/prefix``): any S3-compatible object store.

One object per chunk (a checksummed serde frame) named ``<prefix>/<key hex>``.
Requests of a batch run in parallel (``extra_config.s3_max_concurrency``,
default 16), since each is a round trip. Credentials come from boto3's usual
chain (environment, ``~/.aws``, instance roles); the endpoint of a non-AWS
store from ``extra_config.s3_endpoint_url`` or ``AWS_ENDPOINT_URL``. The bucket
must exist; a lifecycle rule on it bounds what is kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from lmcache_core.auth import FrameSealer
from lmcache_core.backends.base import BackendCapabilities, BackendContext
from lmcache_core.backends.frame_store import (
    FrameParts,
    FrameStore,
    Oversized,
    check_serde_name,
    frame_bytes,
    sealer_for,
)
from lmcache_core.config import extra_number
from lmcache_core.errors import ConfigError
from lmcache_core.metrics import Metrics
from lmcache_core.serdes.base import Serde

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig


def parse_s3_url(url: str) -> tuple[str, str]:
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise ConfigError([f"remote_url={url!r}: write an S3 location as s3://bucket/prefix"])
    prefix = u.path.strip("/")
    return u.netloc, f"{prefix}/" if prefix else ""


class S3Backend(FrameStore):
    name = "s3"
    capabilities = BackendCapabilities(persistent=True, shared=True, exact_usage=False)

    def __init__(
        self,
        url: str,
        *,
        serde: Serde | None = None,
        metrics: Metrics | None = None,
        max_chunk_bytes: int = 1 << 31,
        sealer: FrameSealer | None = None,
        endpoint_url: str | None = None,
        max_concurrency: int = 16,
        timeout_s: float = 10.0,
        client: Any = None,
    ) -> None:
        bucket, prefix = parse_s3_url(url)
        super().__init__(
            serde=serde,
            metrics=metrics,
            max_chunk_bytes=max_chunk_bytes,
            name_prefix=prefix,
            sealer=sealer,
        )
        self.bucket = bucket
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ConfigError(
                    ["remote_url is an s3:// URL but boto3 is not installed: "
                     "pip install 'lmcache[s3]'"]
                ) from None  # fmt: skip
            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
                config=Config(
                    connect_timeout=min(timeout_s, 2.0),
                    read_timeout=timeout_s,
                    retries={"max_attempts": 2, "mode": "standard"},
                    max_pool_connections=max_concurrency,
                ),
            )
        self.client = client
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="lmcache-s3")

    @classmethod
    def from_config(cls, config: CacheConfig, context: BackendContext) -> S3Backend:
        assert config.remote_url is not None
        extra = config.extra_config
        return cls(
            config.remote_url,
            serde=check_serde_name(config.remote_serde),
            metrics=context.metrics,
            max_chunk_bytes=context.pool.slot_bytes,
            sealer=sealer_for(config, context, cls.name),
            endpoint_url=extra.get("s3_endpoint_url"),
            max_concurrency=extra_number(config, "s3_max_concurrency", 16, integer=True),
            timeout_s=config.blocking_timeout_secs,
        )

    def _missing(self, e: Exception) -> bool:
        code = getattr(e, "response", {}).get("Error", {}).get("Code")
        return code in ("NoSuchKey", "404", "NotFound")

    def _get_one(self, name: str, limit: int) -> bytes | Oversized | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=name)
        except Exception as e:
            if self._missing(e):
                return None
            raise
        body = obj["Body"]
        try:
            size = int(obj.get("ContentLength") or 0)
            if size > limit:
                return Oversized(size)
            # Never trust the length: read at most one byte more than a frame can be.
            data = body.read(limit + 1)
        finally:
            body.close()
        return Oversized(len(data)) if len(data) > limit else data

    def _read(self, names: list[str], limit: int) -> list[bytes | memoryview | Oversized | None]:
        return list(self._pool.map(lambda n: self._get_one(n, limit), names))

    def _put_one(self, item: tuple[str, FrameParts]) -> bool:
        name, parts = item
        try:
            # Keys name immutable content: the first writer wins (conditional write).
            self.client.put_object(
                Bucket=self.bucket, Key=name, Body=bytes(frame_bytes(parts)), IfNoneMatch="*"
            )
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise
        return True

    def _write(self, items: list[tuple[str, FrameParts]]) -> list[bool]:
        return list(self._pool.map(self._put_one, items))

    def _head(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=name)
            return True
        except Exception as e:
            if self._missing(e):
                return False
            raise

    def _exists(self, names: list[str]) -> list[bool]:
        return list(self._pool.map(self._head, names))

    def _delete(self, names: list[str]) -> int:
        present = sum(self._exists(names))
        for i in range(0, len(names), 1000):
            batch = [{"Key": n} for n in names[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return present

    def _names(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.name_prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]

    @property
    def capacity_bytes(self) -> int:
        return sys.maxsize

    def close(self) -> None:
        self._pool.shutdown(wait=True)
