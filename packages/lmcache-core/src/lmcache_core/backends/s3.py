"""The S3 tier (``remote_url: s3://bucket/prefix``): any S3-compatible object store.

One object per chunk (a checksummed serde frame) named ``<prefix>/<key hex>``.
Requests of a batch run in parallel (``extra_config.s3_max_concurrency``,
default 16), since each is a round trip. Credentials come from boto3's usual
chain (environment, ``~/.aws``, instance roles); the endpoint of a non-AWS
store from ``extra_config.s3_endpoint_url`` or ``AWS_ENDPOINT_URL``. The bucket
must exist; a lifecycle rule on it bounds what is kept.

Upstream LMCache's S3 settings work as they are: the URL forms
``s3://<bucket>.s3.<region>.amazonaws.com`` (region from the host) and
``s3://<host>:<port>/<bucket>`` (a non-AWS endpoint, path style), and in
``extra_config`` ``s3_region``, ``aws_access_key_id``/``aws_secret_access_key``
(empty: the default chain), ``disable_tls`` (plain HTTP to the endpoint) and
``s3_num_io_threads`` (read as ``s3_max_concurrency``). Its CRT-specific
``s3_prefer_http2``, ``s3_enable_s3express`` and ``save_chunk_meta`` have no
effect here.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

from lmcache_core.auth import FrameSealer
from lmcache_core.backends.base import BackendCapabilities, BackendContext
from lmcache_core.backends.frame_store import (
    FrameParts,
    FrameStore,
    Oversized,
    frame_bytes,
)
from lmcache_core.config import extra_bool, extra_number
from lmcache_core.config_extra import ExtraKey
from lmcache_core.errors import ConfigError
from lmcache_core.metrics import Metrics
from lmcache_core.serdes.base import Serde

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig


_AWS_HOST = re.compile(
    r"^(?P<bucket>.+)\.s3(?:express-[^.]+)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com$"
)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"
    region: str | None = None
    endpoint: str | None = None  # host:port of a non-AWS store, path style


def parse_s3_location(url: str) -> S3Location:
    """``s3://bucket/prefix``, or upstream's ``s3://<bucket>.s3.<region>.amazonaws.com``
    and ``s3://host:port/bucket[/prefix]`` forms."""
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise ConfigError([f"remote_url={url!r}: write an S3 location as s3://bucket/prefix"])
    path = u.path.strip("/")
    if ":" in u.netloc:  # host:port: an endpoint, the bucket is the first path part
        bucket, _, prefix = path.partition("/")
        if not bucket:
            raise ConfigError(
                [f"remote_url={url!r}: name the bucket after the endpoint: s3://host:port/bucket"]
            )
        return S3Location(bucket, f"{prefix}/" if prefix else "", endpoint=u.netloc)
    m = _AWS_HOST.match(u.netloc)
    if m:
        return S3Location(m["bucket"], f"{path}/" if path else "", region=m["region"])
    return S3Location(u.netloc, f"{path}/" if path else "")


def parse_s3_url(url: str) -> tuple[str, str]:
    loc = parse_s3_location(url)
    return loc.bucket, loc.prefix


class S3Backend(FrameStore):
    name = "s3"
    capabilities = BackendCapabilities(persistent=True, shared=True, exact_usage=False)
    extra_config_keys: ClassVar[Mapping[str, str]] = {
        "s3_endpoint_url": ExtraKey("endpoint of a non-AWS store (or AWS_ENDPOINT_URL)"),
        "s3_max_concurrency": ExtraKey(
            "requests of a batch in flight at once (default 16)", "integer", minimum=1, maximum=1024
        ),
        "s3_num_io_threads": ExtraKey(
            "upstream's name for s3_max_concurrency", "integer", minimum=1, maximum=1024
        ),
        "s3_region": ExtraKey("the bucket's region", max_length=256),
        "aws_access_key_id": ExtraKey(
            "access key (with aws_secret_access_key; default: boto3's chain)"
        ),
        "aws_secret_access_key": ExtraKey("secret key (with aws_access_key_id)"),
        "disable_tls": ExtraKey("plain HTTP to the endpoint", "bool"),
    }

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
        region: str | None = None,
        credentials: tuple[str, str] | None = None,
        use_tls: bool = True,
    ) -> None:
        loc = parse_s3_location(url)
        bucket, prefix = loc.bucket, loc.prefix
        if endpoint_url is None and loc.endpoint is not None:
            endpoint_url = f"{'https' if use_tls else 'http'}://{loc.endpoint}"
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
            keys = {}
            if credentials is not None:
                keys = {
                    "aws_access_key_id": credentials[0],
                    "aws_secret_access_key": credentials[1],
                }
            client = boto3.client(
                "s3",
                region_name=region or loc.region,
                use_ssl=use_tls,
                **keys,
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
        key_id, secret = extra.get("aws_access_key_id"), extra.get("aws_secret_access_key")
        if bool(key_id) != bool(secret):
            raise ConfigError(
                [
                    "extra_config: give both aws_access_key_id and aws_secret_access_key, or "
                    "neither (boto3's default chain: environment, ~/.aws, instance role)"
                ]
            )
        concurrency_key = "s3_max_concurrency"
        if concurrency_key not in extra and "s3_num_io_threads" in extra:
            concurrency_key = "s3_num_io_threads"  # upstream's name
        return cls(
            config.remote_url,
            **cls.common_kwargs(config, context),
            endpoint_url=extra.get("s3_endpoint_url"),
            max_concurrency=extra_number(config, concurrency_key, 16, integer=True),
            timeout_s=config.blocking_timeout_secs,
            region=extra.get("s3_region"),
            credentials=(str(key_id), str(secret)) if key_id else None,
            use_tls=not extra_bool(config, "disable_tls"),
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
