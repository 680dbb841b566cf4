"""S3-FIFO (Yang et al., SOSP'23): three FIFO queues, scan resistant.

New keys enter a small FIFO (about 10% of entries). Keys read again while
there move to the main FIFO; one-hit wonders leave early, and their keys are
remembered in a ghost FIFO so that a quick return goes straight to main. In
main, a key that was read since it was last considered gets another round.
For a KV cache this keeps shared system prompts in DRAM while long one-off
documents pass through.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from lmcache_core.eviction.base import EvictionPolicy

_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, small_ratio: float = 0.1) -> None:
        if not 0 < small_ratio < 1:
            raise ValueError(f"small_ratio={small_ratio} must be in (0, 1)")
        self.small_ratio = small_ratio
        self._small: OrderedDict[Hashable, None] = OrderedDict()
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}

    def on_insert(self, key: Hashable) -> None:
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._freq[key] = 0

    def on_access(self, key: Hashable) -> None:
        f = self._freq.get(key)
        if f is not None and f < _MAX_FREQ:
            self._freq[key] = f + 1

    def on_remove(self, key: Hashable) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def evict(self, is_evictable: Callable[[Hashable], bool]) -> Hashable | None:
        # Each tracked key is looked at a bounded number of times (frequency
        # decrements plus one pass for unevictable keys), so this terminates.
        budget = (len(self._freq) + 1) * (_MAX_FREQ + 2)
        while budget > 0 and self._freq:
            budget -= 1
            total = len(self._freq)
            if self._small and (len(self._small) >= self.small_ratio * total or not self._main):
                key, _ = self._small.popitem(last=False)
                if not is_evictable(key):
                    self._small[key] = None
                    if all(not is_evictable(k) for k in self._small) and not self._main:
                        return None
                    continue
                if self._freq[key] > 0:
                    self._freq[key] = 0
                    self._main[key] = None
                    continue
                del self._freq[key]
                self._remember(key)
                return key
            key, _ = self._main.popitem(last=False)
            if not is_evictable(key):
                self._main[key] = None
                continue
            if self._freq[key] > 0:
                self._freq[key] -= 1
                self._main[key] = None
                continue
            del self._freq[key]
            return key
        # Only unevictable keys got here; fall back to a plain scan.
        for queue in (self._small, self._main):
            for key in queue:
                if is_evictable(key):
                    del queue[key]
                    del self._freq[key]
                    return key
        return None

    def _remember(self, key: Hashable) -> None:
        self._ghost[key] = None
        limit = max(len(self._main), 16)
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq
