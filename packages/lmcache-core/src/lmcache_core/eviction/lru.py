"""Least recently used: the default, as in LMCache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from lmcache_core.eviction.base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = None

    def on_access(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def evict(self, is_evictable: Callable[[Hashable], bool]) -> Hashable | None:
        for key in self._order:
            if is_evictable(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order
