"""``SettledWrites``: a write-behind tier whose ``put`` waits for its writes.

The shipped suites check the state a backend is in after each call; a tier
that writes behind reaches it a moment later. Wrapping it here lets the same
suites run on it (``ManagedTier`` in core, or the tiers an adapter builds).
"""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lmcache_core.backends.base import ChunkAllocator, StorageBackend
from lmcache_core.keys import CacheKey
from lmcache_core.pool import Chunk
from lmcache_core.tier import ManagedTier


class SettledWrites(StorageBackend):
    def __init__(self, tier: ManagedTier, on_close: Callable[[], Any] | None = None) -> None:
        self.tier = tier
        self.name = tier.name  # type: ignore[misc]
        self.capabilities = tier.capabilities  # type: ignore[misc]
        self._on_close = on_close

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        ok = self.tier.put(chunks)
        if not self.tier.flush(10):
            faulthandler.dump_traceback(sys.stderr)  # who holds the writer up
            raise AssertionError("write-behind did not drain in 10 s")
        return ok

    def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        return self.tier.contains(keys)

    def get(self, keys: Sequence[CacheKey], allocator: ChunkAllocator) -> list[Chunk | None]:
        return self.tier.get(keys, allocator)

    def remove(self, keys: Sequence[CacheKey]) -> int:
        return self.tier.remove(keys)

    def keys(self) -> Iterator[CacheKey]:
        return self.tier.keys()

    def pin(self, keys: Sequence[CacheKey], owner: str, ttl_s: float) -> int:
        return self.tier.pin(keys, owner, ttl_s)

    def unpin(self, owner: str) -> int:
        return self.tier.unpin(owner)

    @property
    def used_bytes(self) -> int:
        return self.tier.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.tier.capacity_bytes

    def close(self) -> None:
        self.tier.close()
        if self._on_close is not None:
            self._on_close()
