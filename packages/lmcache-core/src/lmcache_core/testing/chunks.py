"""Helpers that make chunks *around* a backend, so the suites test the backend, not themselves."""

from __future__ import annotations

import hashlib

import numpy as np

from lmcache_core.keys import CacheKey
from lmcache_core.pool import Chunk, SlotPool

_NS = hashlib.sha256(b"lmcache conformance namespace").digest()[:16]


def test_key(i: int, namespace: bytes = _NS) -> CacheKey:
    """A deterministic key for test item ``i``."""
    return CacheKey.of(namespace, hashlib.sha256(b"key:%d" % i).digest())


test_key.__test__ = False  # type: ignore[attr-defined]


def chunk_payload(key: CacheKey, nbytes: int) -> bytes:
    """Deterministic, never-zero bytes for ``key``: the expected content of its chunk."""
    seed = int.from_bytes(hashlib.sha256(key.to_bytes()).digest()[:8], "little")
    data = np.random.default_rng(seed).integers(1, 256, size=nbytes, dtype=np.uint8)
    return data.tobytes()


class ChunkFactory:
    """A pool of its own that makes chunks filled with :func:`chunk_payload`."""

    def __init__(self, slot_bytes: int, num_slots: int = 256) -> None:
        self.pool = SlotPool.anonymous(slot_bytes * num_slots, slot_bytes)
        self.slot_bytes = self.pool.slot_bytes

    def make(self, key: CacheKey, nbytes: int | None = None, num_tokens: int = 16) -> Chunk:
        nbytes = self.slot_bytes if nbytes is None else nbytes
        chunk = self.pool.allocate(key, num_tokens, nbytes)
        if chunk is None:
            raise RuntimeError("ChunkFactory ran out of slots: release chunks in the test")
        chunk.view[:] = chunk_payload(key, nbytes)
        return chunk

    def allocate(self, key: CacheKey, num_tokens: int, nbytes: int) -> Chunk | None:
        """The allocator handed to ``StorageBackend.get``."""
        return self.pool.allocate(key, num_tokens, nbytes)

    def close(self) -> None:
        self.pool.close()
