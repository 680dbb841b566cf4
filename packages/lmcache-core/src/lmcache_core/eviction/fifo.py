"""First in, first out: upstream LMCache's ``FIFO`` policy (reads do not refresh a chunk)."""

from __future__ import annotations

from collections.abc import Hashable

from lmcache_core.eviction.lru import LRUPolicy


class FIFOPolicy(LRUPolicy):
    """LRU's order without the move on access: insertion order alone decides."""

    name = "fifo"

    def on_access(self, key: Hashable) -> None:
        return
