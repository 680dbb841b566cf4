"""The CPU DRAM tier: an index over chunks that live in the memory pool.

Zero-copy both ways: ``put`` keeps a reference to the caller's chunk, ``get``
hands out another reference to the same slot. When the pool is full,
:meth:`LocalCPUBackend.allocate` evicts chunks that nobody is reading and
nobody has pinned. Pins expire, so a request that vanished between lookup
and retrieve cannot fill the cache with stuck chunks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import xxhash

from lmcache_core.backends.base import (
    BackendCapabilities,
    BackendContext,
    ChunkAllocator,
    StorageBackend,
)
from lmcache_core.eviction.base import EvictionPolicy
from lmcache_core.eviction.lru import LRUPolicy
from lmcache_core.metrics import Metrics
from lmcache_core.plugins import EVICTION_POLICIES, load_plugin
from lmcache_core.pool import Chunk, SlotPool

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig
    from lmcache_core.keys import CacheKey

logger = logging.getLogger(__name__)


class LocalCPUBackend(StorageBackend):
    name = "cpu"
    capabilities = BackendCapabilities(zero_copy=True, pinning=True, evicts=True)

    def __init__(
        self,
        pool: SlotPool,
        policy: EvictionPolicy | None = None,
        metrics: Metrics | None = None,
        *,
        checksums: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        #: With checksums, a chunk whose bytes changed since it was stored (a
        #: stray write into the arena) is dropped on read: a miss, never wrong KV.
        self._checksums: dict[CacheKey, bytes] | None = {} if checksums else None
        self.policy = policy if policy is not None else LRUPolicy()
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._lock = threading.RLock()
        self._index: dict[CacheKey, Chunk] = {}
        self._used = 0
        self._pins: dict[str, tuple[float, list[CacheKey]]] = {}
        self._pin_counts: dict[CacheKey, int] = {}
        #: Called as ``on_evict(chunk, may_demote)`` with each chunk as it is evicted,
        #: before its slot is freed (the engine demotes it to disk, and tells the
        #: p2p tier); it may retain the chunk only when ``may_demote``.
        self.on_evict: Callable[[Chunk, bool], None] | None = None
        self.metrics.set("lmcache:capacity_bytes", pool.capacity_bytes, tier=self.name)

    @classmethod
    def from_config(cls, config: CacheConfig, context: BackendContext) -> LocalCPUBackend:
        policy = load_plugin(EVICTION_POLICIES, config.cache_policy)()
        return cls(context.pool, policy, context.metrics, checksums=config.local_cpu_checksums)

    # ------------------------------------------------------------------ allocation

    def allocate(self, key: CacheKey, num_tokens: int, nbytes: int) -> Chunk | None:
        """A fresh chunk from the pool, evicting unused chunks to make room.

        Returns None (and counts it) when everything in the pool is pinned or
        being read: the caller skips storing, it never blocks.
        """
        chunk = self.pool.allocate(key, num_tokens, nbytes)
        if chunk is not None:
            return chunk
        with self._lock:
            self._expire_pins()
            # Only the first eviction of a call may demote: a demoted chunk keeps
            # its slot until written, and demoting every victim would empty the tier.
            demote = True
            while chunk is None:
                if not self._evict_one(demote):
                    self.metrics.inc("lmcache:num_store_skipped_full", tier=self.name)
                    return None
                demote = False
                chunk = self.pool.allocate(key, num_tokens, nbytes)
        return chunk

    def _evictable(self, key: object) -> bool:
        chunk = self._index.get(key)  # type: ignore[call-overload]
        return chunk is not None and chunk.refs == 1 and not self._pin_counts.get(key)  # type: ignore[call-overload]

    def _evict_one(self, demote: bool = False) -> bool:
        victim = self.policy.evict(self._evictable)
        if victim is None:
            return False
        self._evict(victim, demote)  # type: ignore[arg-type]
        return True

    def evict_keys(self, keys: Sequence[CacheKey]) -> int:
        """Evict these of ``keys`` that nobody reads or pins, as the policy's own victims
        would be (told to ``on_evict``, so demoted and announced); returns how many.

        For a caller that picks victims itself: an ``lmcache server`` making room
        inside one tenant's quota.
        """
        n = 0
        with self._lock:
            self._expire_pins()
            for key in keys:
                if self._evictable(key):
                    self.policy.on_remove(key)
                    self._evict(key, True)
                    n += 1
        return n

    def _evict(self, victim: CacheKey, demote: bool) -> None:
        chunk = self._index.pop(victim)
        if self._checksums is not None:
            self._checksums.pop(victim, None)
        self._used -= chunk.nbytes
        if self.on_evict is not None:
            try:
                self.on_evict(chunk, demote)
            except Exception:
                logger.warning("demoting an evicted chunk failed", exc_info=True)
        chunk.release()
        self.metrics.inc("lmcache:num_evictions", tier=self.name)
        self.metrics.set("lmcache:usage_bytes", self._used, tier=self.name)

    # ------------------------------------------------------------------ protocol

    def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        index = self._index
        return [k in index for k in keys]

    def prefix_length(self, keys: Sequence[CacheKey]) -> int:
        """How many leading ``keys`` are stored (the lookup fast path)."""
        index = self._index
        n = 0
        for k in keys:
            if k not in index:
                break
            n += 1
        return n

    def get(
        self, keys: Sequence[CacheKey], allocator: ChunkAllocator | None = None
    ) -> list[Chunk | None]:
        out: list[Chunk | None] = []
        nbytes = 0
        with self._lock:
            for key in keys:
                chunk = self._index.get(key)
                if chunk is not None:
                    chunk.retain()
                    self.policy.on_access(key)
                    nbytes += chunk.nbytes
                out.append(chunk)
        if self._checksums is not None:
            for i, chunk in enumerate(out):
                if chunk is not None and xxhash.xxh3_64_digest(chunk.view) != self._checksums.get(
                    chunk.key
                ):
                    logger.error("chunk %r changed in DRAM since it was stored; dropped", chunk.key)
                    self.metrics.inc("lmcache:num_corrupt_chunks", tier=self.name)
                    nbytes -= chunk.nbytes
                    chunk.release()
                    self.remove([chunk.key])
                    out[i] = None
        if nbytes:
            self.metrics.inc("lmcache:retrieved_bytes", nbytes, tier=self.name)
        return out

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        stored: list[bool] = []
        added = 0
        with self._lock:
            for chunk in chunks:
                if chunk.key in self._index:
                    stored.append(True)
                    continue
                if chunk.pool is self.pool:
                    own = chunk.retain()
                else:
                    # A chunk from another pool (a test harness, a staging pool):
                    # copy it in, since this tier only indexes its own slots.
                    maybe = self.allocate(chunk.key, chunk.num_tokens, chunk.nbytes)
                    if maybe is None:
                        stored.append(False)
                        continue
                    own = maybe
                    own.view[:] = chunk.view
                self._index[chunk.key] = own
                if self._checksums is not None:
                    self._checksums[chunk.key] = xxhash.xxh3_64_digest(own.view)
                self.policy.on_insert(chunk.key)
                self._used += own.nbytes
                added += own.nbytes
                stored.append(True)
            usage = self._used
        if added:
            self.metrics.inc("lmcache:stored_bytes", added, tier=self.name)
            self.metrics.set("lmcache:usage_bytes", usage, tier=self.name)
        return stored

    def remove(self, keys: Sequence[CacheKey]) -> int:
        n = 0
        with self._lock:
            for key in keys:
                chunk = self._index.pop(key, None)
                if chunk is None:
                    continue
                if self._checksums is not None:
                    self._checksums.pop(key, None)
                self.policy.on_remove(key)
                self._used -= chunk.nbytes
                chunk.release()
                n += 1
            self.metrics.set("lmcache:usage_bytes", self._used, tier=self.name)
        return n

    def keys(self) -> Iterator[CacheKey]:
        with self._lock:
            return iter(list(self._index))

    # ------------------------------------------------------------------ pins

    def pin(self, keys: Sequence[CacheKey], owner: str, ttl_s: float) -> int:
        if ttl_s <= 0:
            raise ValueError(f"pin ttl must be positive, got {ttl_s}")
        with self._lock:
            self._expire_pins()
            pinned = [k for k in keys if k in self._index]
            deadline = self._clock() + ttl_s
            old_deadline, held = self._pins.get(owner, (deadline, []))
            held.extend(pinned)
            self._pins[owner] = (max(deadline, old_deadline), held)
            for k in pinned:
                self._pin_counts[k] = self._pin_counts.get(k, 0) + 1
            self._count_pins()
        return len(pinned)

    def unpin(self, owner: str) -> int:
        with self._lock:
            entry = self._pins.pop(owner, None)
            if entry is None:
                return 0
            self._drop_pins(entry[1])
            self._count_pins()
            return len(entry[1])

    def _drop_pins(self, keys: list[CacheKey]) -> None:
        for k in keys:
            c = self._pin_counts.get(k, 0) - 1
            if c > 0:
                self._pin_counts[k] = c
            else:
                self._pin_counts.pop(k, None)

    def _expire_pins(self) -> None:
        now = self._clock()
        expired = [o for o, (deadline, _) in self._pins.items() if deadline <= now]
        for owner in expired:
            _, keys = self._pins.pop(owner)
            self._drop_pins(keys)
            logger.warning("pins of %r expired after their timeout; was it abandoned?", owner)
        if expired:
            self.metrics.inc("lmcache:num_expired_pins", len(expired), tier=self.name)
            self._count_pins()

    def _count_pins(self) -> None:
        """Publish how many chunks are pinned: it returns to 0 when no request is in flight,
        so a leak shows on a dashboard (and in the soak test) instead of as a full tier."""
        self.metrics.set("lmcache:pinned_chunks", len(self._pin_counts), tier=self.name)

    def pinned_keys(self) -> set[CacheKey]:
        with self._lock:
            self._expire_pins()
            return set(self._pin_counts)

    # ------------------------------------------------------------------ sizes

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def capacity_bytes(self) -> int:
        return self.pool.capacity_bytes

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        with self._lock:
            for key, chunk in list(self._index.items()):
                self.policy.on_remove(key)
                chunk.release()
            self._index.clear()
            if self._checksums is not None:
                self._checksums.clear()
            self._pins.clear()
            self._pin_counts.clear()
            self._count_pins()
            self._used = 0
