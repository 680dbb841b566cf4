"""Least frequently used: upstream LMCache's ``LFU`` policy.

The victim is the evictable key read the fewest times since it was stored;
among equals, the one stored (or last promoted to its count) first. Keys are
kept in one insertion-ordered bucket per count, so an access is O(1) and an
eviction walks the counts upward (there are few distinct counts).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from lmcache_core.eviction.base import EvictionPolicy


class LFUPolicy(EvictionPolicy):
    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}

    def _add(self, key: Hashable, count: int) -> None:
        self._count[key] = count
        self._buckets.setdefault(count, OrderedDict())[key] = None

    def _drop(self, key: Hashable) -> None:
        count = self._count.pop(key)
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]

    def on_insert(self, key: Hashable) -> None:
        self._add(key, 1)

    def on_access(self, key: Hashable) -> None:
        if key in self._count:
            count = self._count[key]
            self._drop(key)
            self._add(key, count + 1)

    def on_remove(self, key: Hashable) -> None:
        if key in self._count:
            self._drop(key)

    def evict(self, is_evictable: Callable[[Hashable], bool]) -> Hashable | None:
        for count in sorted(self._buckets):
            for key in self._buckets[count]:
                if is_evictable(key):
                    self._drop(key)
                    return key
        return None

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, key: object) -> bool:
        return key in self._count
