"""The Redis / Valkey tier: one value per chunk, shared by every instance that points at it.

URLs (``remote_url``):

* ``redis://host:6379/0``, ``valkey://host:6379`` - plain TCP;
* ``rediss://``, ``valkeys://`` - TLS (``?ssl_cert_reqs=none`` and the other
  redis-py URL options are passed through);
* ``redis+cluster://host:7000`` (``rediss+cluster://``) - Redis Cluster, for
  users who outgrow one server; any node of the cluster will do.

The password comes from the URL (``redis://:secret@host``) or, so that it
stays out of config files, from ``LMCACHE_REDIS_PASSWORD`` (and
``LMCACHE_REDIS_USERNAME``).

Each chunk is one string value (a checksummed serde frame) under
``lmcache:<key hex>``, written with ``SET NX`` (keys name immutable content),
read with ``MGET``, checked with pipelined ``EXISTS``: one round trip per
batch. The server bounds memory: set ``maxmemory`` with an ``allkeys-lru``
policy; lmcache never deletes other instances' chunks except ones that fail
their checksum. Optional ``extra_config``: ``redis_ttl`` (seconds a value
lives), ``redis_key_prefix``, ``redis_connect_timeout`` (seconds, default 2).

Upstream LMCache's Valkey settings work as they are: ``extra_config``
``valkey_username``/``valkey_password`` (a password in the URL wins, then
these, then the environment), ``valkey_database`` (a database number),
``valkey_mode: cluster`` (a cluster behind a plain ``valkey://`` URL), and its
node-list form ``valkey://h1:p1, h2:p2`` (any one node finds the cluster; the
first is used).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse, urlunparse

from lmcache_core.auth import FrameSealer
from lmcache_core.backends.base import BackendCapabilities, BackendContext
from lmcache_core.backends.frame_store import (
    FrameParts,
    FrameStore,
    Oversized,
    Unusable,
    frame_bytes,
)
from lmcache_core.config import extra_number
from lmcache_core.config_extra import ExtraKey
from lmcache_core.errors import ConfigError
from lmcache_core.metrics import Metrics
from lmcache_core.serdes.base import Serde

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig

logger = logging.getLogger(__name__)

PASSWORD_ENV = "LMCACHE_REDIS_PASSWORD"
USERNAME_ENV = "LMCACHE_REDIS_USERNAME"

_SCHEMES = {
    "redis": ("redis", False),
    "valkey": ("redis", False),
    "rediss": ("rediss", False),
    "valkeys": ("rediss", False),
    "redis+cluster": ("redis", True),
    "valkey+cluster": ("redis", True),
    "rediss+cluster": ("rediss", True),
    "valkeys+cluster": ("rediss", True),
}


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError(
            [
                "remote_url is a Redis/Valkey URL but the redis client is not installed: "
                "pip install 'lmcache[redis]' (or pip install redis)"
            ]
        ) from None
    return redis


def client_url(url: str) -> tuple[str, bool]:
    """The redis-py URL for a ``remote_url``, and whether it names a cluster."""
    scheme_end = url.find("://")
    if scheme_end > 0 and "," in url[scheme_end:].split("/", 3)[2]:
        # Upstream's node list (valkey://h1:p1, h2:p2): one node is enough.
        rest = url[scheme_end + 3 :]
        netloc, sep, path = rest.partition("/")
        url = f"{url[:scheme_end]}://{netloc.split(',')[0].strip()}{sep}{path}"
    u = urlparse(url)
    scheme = u.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            [f"remote_url={url!r}: scheme must be one of {', '.join(sorted(_SCHEMES))}"]
        )
    if not u.hostname:
        raise ConfigError([f"remote_url={url!r} has no host; write e.g. redis://localhost:6379"])
    try:
        u.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError([f"remote_url={url!r} has an invalid port"]) from None
    real, cluster = _SCHEMES[scheme]
    return urlunparse(u._replace(scheme=real)), cluster


class RedisBackend(FrameStore):
    name = "redis"
    capabilities = BackendCapabilities(persistent=True, shared=True, exact_usage=False)
    streams_writes: ClassVar[bool] = True
    extra_config_keys: ClassVar[Mapping[str, str]] = {
        # Checked when the config is read (config_extra.ExtraKey): a TTL under 1 ms was
        # silently none, 1e300 made every write fail, a surrogate prefix every name.
        "redis_key_prefix": ExtraKey(
            "prefix of every chunk's name (default lmcache:)", "text", max_length=256
        ),
        "redis_ttl": ExtraKey(
            "seconds a value lives (default: until the server evicts it)",
            "number",
            minimum=0.001,
            maximum=10 * 365 * 86400,
            unit="seconds",
        ),
        "redis_connect_timeout": ExtraKey(
            "seconds to connect (default 2)",
            "number",
            minimum=0,
            open_minimum=True,
            maximum=3600,
            unit="seconds",
        ),
        "valkey_username": ExtraKey(
            "user name (upstream's Valkey key; a URL password wins)", "text", max_length=1024
        ),
        "valkey_password": ExtraKey(
            "password (upstream's Valkey key; after a URL password, before LMCACHE_REDIS_PASSWORD)",
            "text",
            max_length=4096,
        ),
        "valkey_database": ExtraKey(
            "database number (not with a cluster)", "integer", minimum=0, maximum=2**31 - 1
        ),
        "valkey_mode": ExtraKey(
            "standalone (default) or cluster: a cluster behind a valkey:// URL",
            "choice",
            choices=("standalone", "cluster"),
        ),
    }
    #: Frames are handed to the sender once this many bytes are packed.
    send_batch_bytes = 1 << 20

    def __init__(
        self,
        url: str,
        *,
        serde: Serde | None = None,
        metrics: Metrics | None = None,
        max_chunk_bytes: int = 1 << 31,
        sealer: FrameSealer | None = None,
        key_prefix: str = "lmcache:",
        ttl_s: float | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        username: str | None = None,
        password: str | None = None,
        database: int | None = None,
        cluster: bool = False,
    ) -> None:
        super().__init__(
            serde=serde,
            metrics=metrics,
            max_chunk_bytes=max_chunk_bytes,
            name_prefix=key_prefix,
            sealer=sealer,
        )
        redis = self._redis = _import_redis()
        self._sender = ThreadPoolExecutor(8, thread_name_prefix="lmcache-redis-send")
        real_url, self.cluster = client_url(url)
        self.cluster = self.cluster or cluster
        self.url = url
        self.ttl_ms = int(ttl_s * 1000) if ttl_s else None
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": connect_timeout_s,
        }
        u = urlparse(real_url)
        if u.password is None and password:
            kwargs["password"] = password
            if username:
                kwargs["username"] = username
        elif u.password is None and os.environ.get(PASSWORD_ENV):
            kwargs["password"] = os.environ[PASSWORD_ENV]
            if os.environ.get(USERNAME_ENV):
                kwargs["username"] = os.environ[USERNAME_ENV]
        if database is not None and not self.cluster:
            kwargs["db"] = database
        if self.cluster:
            from redis.cluster import RedisCluster

            self.client = RedisCluster.from_url(real_url, **kwargs)
        else:
            kwargs["health_check_interval"] = 30
            self.client = redis.Redis.from_url(real_url, **kwargs)

    @classmethod
    def from_config(cls, config: CacheConfig, context: BackendContext) -> RedisBackend:
        assert config.remote_url is not None
        extra = config.extra_config
        return cls(
            config.remote_url,
            **cls.common_kwargs(config, context),
            key_prefix=str(extra.get("redis_key_prefix", "lmcache:")),
            ttl_s=extra_number(config, "redis_ttl", None),  # a negative TTL fails every SET
            timeout_s=config.blocking_timeout_secs,
            connect_timeout_s=extra_number(config, "redis_connect_timeout", 2.0),
            username=_opt_str(extra.get("valkey_username")),
            password=_opt_str(extra.get("valkey_password")),
            database=extra_number(config, "valkey_database", None, integer=True, inclusive=True),
            cluster=_valkey_cluster(extra.get("valkey_mode")),
        )

    # ------------------------------------------------------------------ moving frames

    def _read(
        self, names: list[str], limit: int
    ) -> list[bytes | memoryview | Oversized | Unusable | None]:
        # GETRANGE 0..limit reads at most limit + 1 bytes of any value: one more
        # than a frame can be tells an oversized value without reading it all.
        # Errors stay per name: a LIST under one chunk's name (WRONGTYPE) is that
        # chunk's miss, never the batch's (nor a tier failure).
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.getrange(name, 0, limit)
        out: list[bytes | memoryview | Oversized | Unusable | None] = []
        for value in pipe.execute(raise_on_error=False):
            if isinstance(value, Exception):
                if not _wrong_type(value):
                    raise value  # the server's trouble (loading, auth, ...): the tier's
                out.append(Unusable(f"not a string value: {value}"))
            elif not value:
                out.append(None)  # GETRANGE answers "" for a missing name
            elif len(value) > limit:
                out.append(Oversized(len(value)))
            else:
                out.append(value)
        return out

    def _write(self, items: Iterable[tuple[str, FrameParts]]) -> list[bool]:
        # SET NX answers None when the name existed: the value there is the same content.
        if self.cluster:
            pipe = self.client.pipeline(transaction=False)
            n = 0
            for name, parts in items:
                pipe.set(name, frame_bytes(parts), nx=True, px=self.ttl_ms)
                n += 1
            pipe.execute()
            return [True] * n
        return [True] * self._send_sets(items)

    def _send_sets(self, items: Iterable[tuple[str, FrameParts]]) -> int:
        """Pipelined ``SET name frame NX [PX ttl]`` without joining header and payload.

        redis-py would need the frame as one buffer (a copy of every chunk); the
        protocol does not: the command is packed here and the payload, a view of
        the pool slot, goes to the socket as it is. ``items`` is lazy
        (``streams_writes``): a sender thread puts frame i on the socket (the GIL
        released) while this thread encodes frame i+1, and the answers are read
        once all are sent, so a MAC costs little more than the checksum it
        replaces (docs/benchmarks.md).
        """
        tail = b"\r\n$2\r\nNX\r\n"
        argc = 4
        if self.ttl_ms:
            ttl = str(self.ttl_ms).encode()
            tail += b"$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl)
            argc = 6
        pool = self.client.connection_pool
        conn = pool.get_connection()
        sent = 0
        pending: Future[None] | None = None
        batch: list[bytes | memoryview] = []
        batch_bytes = 0

        def send() -> None:
            nonlocal pending, batch, batch_bytes
            first = pending is None  # the connection's health is checked once, first
            if pending is not None:
                pending.result()
            pending = self._sender.submit(conn.send_packed_command, batch, first)
            batch, batch_bytes = [], 0

        try:
            for name, parts in items:
                nb = name.encode()
                total = sum(memoryview(p).nbytes for p in parts)
                small = b"".join(bytes(p) for p in parts[:-1])  # the header
                batch += [
                    b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s"
                    % (argc, len(nb), nb, total, small),
                    parts[-1],
                    tail,
                ]
                batch_bytes += total
                sent += 1
                if batch_bytes >= self.send_batch_bytes:  # small frames go out together
                    send()
            if batch:
                send()
            if pending is not None:
                pending.result()
                pending = None
            errors = []
            for _ in range(sent):
                try:
                    conn.read_response()
                except self._redis.ResponseError as e:  # e.g. OOM: the value is not stored
                    errors.append(e)
            if errors:
                raise errors[0]
        except BaseException:
            if pending is not None:  # encoding raised: the send in flight ends first
                wait([pending])
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return sent

    def _exists(self, names: list[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        return [bool(n) for n in pipe.execute()]

    def _delete(self, names: list[str]) -> int:
        if self.cluster:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.delete(name)
            return sum(pipe.execute())
        return int(self.client.delete(*names))

    def _names(self) -> Iterator[str]:
        for raw in self.client.scan_iter(match=f"{self.name_prefix}*", count=1000):
            yield raw.decode() if isinstance(raw, bytes) else raw

    # ------------------------------------------------------------------ sizes, lifetime

    @property
    def capacity_bytes(self) -> int:
        """The server's ``maxmemory`` (unbounded when it is 0 or cannot be read)."""
        try:
            info = self.client.info("memory")
            if isinstance(info, dict) and not self.cluster:
                limit = int(info.get("maxmemory", 0))
                if limit:
                    return limit
        except Exception:
            pass
        return sys.maxsize

    def ping(self) -> bool:
        return bool(self.client.ping())

    def close(self) -> None:
        self._sender.shutdown(wait=True)
        try:
            self.client.close()
        except Exception:
            pass


def _wrong_type(err: Exception) -> bool:
    """A per-key error of a value's type (WRONGTYPE), not of the server."""
    return str(err).startswith("WRONGTYPE")


def _opt_str(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _valkey_cluster(mode: Any) -> bool:
    """Upstream's ``valkey_mode``: ``standalone`` (default) or ``cluster``."""
    if mode in (None, "", "standalone"):
        return False
    if mode == "cluster":
        return True
    raise ConfigError(
        [f"extra_config.valkey_mode={mode!r} must be 'standalone' or 'cluster'"], "cache config"
    )
