"""The key types: what makes two caches' KV incompatible, and a chunk's key in it.

:class:`KeyNamespace` hashes the model, KV layout, chunk size, rank and scheme
to 16 bytes; :class:`CacheKey` is that digest followed by a chunk's prefix
hash (computed by :class:`lmcache_core.keys.TokenChunker`). Both are values:
equal inputs give equal bytes on every machine and process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lmcache_core.layout import KVLayout

KEY_SCHEME_VERSION = 2
NAMESPACE_DIGEST_SIZE = 16


def hasher(algorithm: str) -> Any:
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        try:
            from blake3 import blake3
        except ImportError:
            raise ImportError(
                "hash_algorithm=blake3 needs the blake3 package: pip install 'lmcache-core[blake3]'"
            ) from None
        return blake3()
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    raise ValueError(f"unknown hash algorithm {algorithm!r}; use sha256, blake3 or xxh3_128")


@dataclass(frozen=True)
class KeyNamespace:
    """Everything that makes two caches' KV incompatible, hashed to 16 bytes."""

    model: str
    layout: KVLayout
    chunk_size: int = 256
    world_size: int = 1
    rank: int = 0
    hash_algorithm: str = "sha256"
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("KeyNamespace.model must name the model (e.g. its path or repo id)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        hasher(self.hash_algorithm)  # fail early on an unknown or missing algorithm

    def canonical(self) -> dict[str, Any]:
        return {
            "scheme": KEY_SCHEME_VERSION,
            "hash": self.hash_algorithm,
            "model": self.model,
            "layout": self.layout.fingerprint(),
            "chunk_size": self.chunk_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "extra": [list(kv) for kv in self.extra],
        }

    @cached_property
    def digest(self) -> bytes:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).digest()[:NAMESPACE_DIGEST_SIZE]

    def for_rank(self, rank: int) -> KeyNamespace:
        return KeyNamespace(
            self.model,
            self.layout,
            self.chunk_size,
            self.world_size,
            rank,
            self.hash_algorithm,
            self.extra,
        )


class CacheKey(bytes):
    """A chunk's key: the 16-byte namespace digest followed by the prefix hash.

    A ``bytes`` subclass, so it is immutable, hashes once (CPython caches a
    bytes hash) and costs little to build: a 128K-token lookup makes 512.
    """

    __slots__ = ()

    @classmethod
    def of(cls, namespace: bytes, prefix: bytes) -> CacheKey:
        """The key of ``prefix`` in ``namespace`` (``CacheKey(namespace + prefix)`` is the same)."""
        if len(namespace) != NAMESPACE_DIGEST_SIZE or not prefix:
            raise ValueError(
                f"a CacheKey is a {NAMESPACE_DIGEST_SIZE}-byte namespace and a non-empty prefix"
            )
        return cls(namespace + prefix)

    @property
    def namespace(self) -> bytes:
        return bytes(self[:NAMESPACE_DIGEST_SIZE])

    @property
    def prefix(self) -> bytes:
        return bytes(self[NAMESPACE_DIGEST_SIZE:])

    def __reduce__(self) -> tuple[Any, ...]:
        return (CacheKey, (bytes(self),))

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> CacheKey:
        if len(data) <= NAMESPACE_DIGEST_SIZE:
            raise ValueError(f"a CacheKey is more than {NAMESPACE_DIGEST_SIZE} bytes long")
        return cls(bytes(data))

    def hex(self, *args: Any) -> str:  # type: ignore[override]
        """Stable text form, for file names and remote keys: ``v1-<namespace>-<prefix>``."""
        if args:
            return super().hex(*args)
        return f"v{KEY_SCHEME_VERSION}-{self.namespace.hex()}-{self.prefix.hex()}"

    @classmethod
    def from_hex(cls, text: str) -> CacheKey:
        try:
            version, ns, prefix = text.split("-")
            if version != f"v{KEY_SCHEME_VERSION}":
                raise ValueError(version)
            return cls.of(bytes.fromhex(ns), bytes.fromhex(prefix))
        except ValueError:
            raise ValueError(f"{text!r} is not a v{KEY_SCHEME_VERSION} cache key") from None

    def __repr__(self) -> str:
        return f"CacheKey({self.hex()[:24]}...)"
