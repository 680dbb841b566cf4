"""``ManagedTier``: a lower tier as the cache engine uses it.

Wraps any :class:`~lmcache_core.backends.base.StorageBackend` (disk, Redis,
S3, a third party's) with what every lower tier needs and no backend should
have to write itself:

* failures never reach the engine: an exception is counted, the tier's read or
  write path is marked unhealthy (:class:`~lmcache_core.health.TierHealth`)
  and skipped with backoff, and the call answers as a miss;
* writes go behind (:class:`~lmcache_core.write_behind.WriteBehindQueue`):
  ``put`` queues and returns at once; a full queue drops and counts.

It is itself a ``StorageBackend``, so it passes the same conformance suite.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from lmcache_core.backends.base import BackendCapabilities, ChunkAllocator, StorageBackend
from lmcache_core.health import TierHealth
from lmcache_core.metrics import Metrics
from lmcache_core.write_behind import WriteBehindQueue

if TYPE_CHECKING:
    from lmcache_core.keys import CacheKey
    from lmcache_core.pool import Chunk

logger = logging.getLogger(__name__)


class ManagedTier(StorageBackend):
    name = "managed"
    capabilities = BackendCapabilities()

    def __init__(
        self,
        backend: StorageBackend,
        *,
        metrics: Metrics | None = None,
        write_behind_bytes: int | None = None,
        base_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        #: Keys removed while a write of theirs may still be in flight (the write
        #: lock was not free in time): removed again once the write is done.
        self._remove_after_write: set[CacheKey] = set()
        self._remove_lock = threading.Lock()
        self.name = backend.name  # type: ignore[misc]
        self.metrics = metrics if metrics is not None else Metrics()
        self.read_health = TierHealth(
            backend.name,
            self.metrics,
            path="read",
            base_backoff_s=base_backoff_s,
            max_backoff_s=max_backoff_s,
        )
        self.write_health = TierHealth(
            backend.name,
            self.metrics,
            path="write",
            base_backoff_s=base_backoff_s,
            max_backoff_s=max_backoff_s,
        )
        self.queue: WriteBehindQueue | None = None
        if write_behind_bytes:
            self.queue = WriteBehindQueue(
                backend.name, self._write_batch, max_bytes=write_behind_bytes, metrics=self.metrics
            )
        self.capabilities = dataclasses.replace(  # type: ignore[misc]
            backend.capabilities, asynchronous=self.queue is not None
        )

    @property
    def healthy(self) -> bool:
        return self.read_health.healthy and self.write_health.healthy

    # ------------------------------------------------------------------ reads

    def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        n = len(keys)
        present = [False] * n
        rest = list(range(n))
        if self.queue is not None:
            rest = [i for i in rest if not self.queue.holds(keys[i])]
            for i in set(range(n)) - set(rest):
                present[i] = True
        if rest and self.read_health.available("contains"):
            try:
                found = self.backend.contains([keys[i] for i in rest])
            except Exception as e:
                self.read_health.failed("contains", e)
            else:
                self.read_health.succeeded()
                for i, ok in zip(rest, found):
                    present[i] = ok
        return present

    def get(self, keys: Sequence[CacheKey], allocator: ChunkAllocator) -> list[Chunk | None]:
        out: list[Chunk | None] = [None] * len(keys)
        rest = []
        for i, key in enumerate(keys):
            chunk = self.queue.waiting(key) if self.queue is not None else None
            if chunk is not None:
                out[i] = chunk
            else:
                rest.append(i)
        if rest and self.read_health.available("get"):
            try:
                got = self.backend.get([keys[i] for i in rest], allocator)
            except Exception as e:
                self.read_health.failed("get", e)
            else:
                self.read_health.succeeded()
                for i, c in zip(rest, got):
                    out[i] = c
        return out

    # ------------------------------------------------------------------ writes

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        if self.queue is not None:
            return self.queue.submit(chunks)
        return self._put_now(chunks)

    def _write_batch(self, chunks: list[Chunk]) -> None:
        self._put_now(chunks)
        if self._remove_after_write:
            with self._remove_lock:
                late = [c.key for c in chunks if c.key in self._remove_after_write]
                self._remove_after_write.difference_update(late)
            if late:
                self._remove_now(late)

    def _put_now(self, chunks: Sequence[Chunk]) -> list[bool]:
        if not self.write_health.available("put"):
            self.metrics.inc("lmcache:num_dropped_writes", len(chunks), tier=self.name)
            return [False] * len(chunks)
        try:
            ok = self.backend.put(chunks)
        except Exception as e:
            self.write_health.failed("put", e)
            self.metrics.inc("lmcache:num_dropped_writes", len(chunks), tier=self.name)
            return [False] * len(chunks)
        self.write_health.succeeded()
        return ok

    def remove(self, keys: Sequence[CacheKey]) -> int:
        """Remove ``keys``, waiting at most ``timeout_s`` for a write in flight.

        A chunk being written lands first, then goes. If the write hangs (a
        hung server), the keys are removed now and again once it finishes, so
        ``remove`` never blocks the engine longer than ``blocking_timeout_secs``.
        """
        n = 0
        locked = False
        if self.queue is not None:
            n += self.queue.cancel(keys)
            locked = self.queue.write_lock.acquire(timeout=self.timeout_s)
            if not locked:
                logger.warning(
                    "%s tier: a write is still in flight after %.1f s; removing now and again "
                    "after it",
                    self.name,
                    self.timeout_s,
                )
                with self._remove_lock:
                    self._remove_after_write.update(keys)
        try:
            n += self._remove_now(keys)
        finally:
            if locked:
                self.queue.write_lock.release()  # type: ignore[union-attr]
        return n

    def _remove_now(self, keys: Sequence[CacheKey]) -> int:
        if not self.write_health.available("remove"):
            return 0
        try:
            n = self.backend.remove(keys)
        except Exception as e:
            self.write_health.failed("remove", e)
            return 0
        self.write_health.succeeded()
        return n

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued writes (tests, shutdown); False on timeout."""
        return self.queue.flush(timeout) if self.queue is not None else True

    # ------------------------------------------------------------------ the rest

    def keys(self) -> Iterator[CacheKey]:
        if self.queue is None:
            return self.backend.keys()
        with self.queue.write_lock:  # nothing moves from the queue to the backend meanwhile
            seen = list(self.backend.keys())
            have = set(seen)
            seen.extend(k for k in self.queue.held_keys() if k not in have)
        return iter(seen)

    def pin(self, keys: Sequence[CacheKey], owner: str, ttl_s: float) -> int:
        return self.backend.pin(keys, owner, ttl_s)

    def unpin(self, owner: str) -> int:
        return self.backend.unpin(owner)

    @property
    def used_bytes(self) -> int:
        if self.queue is None:
            return self.backend.used_bytes
        with self.queue.write_lock:
            return self.backend.used_bytes + self.queue.queued_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.backend.capacity_bytes

    def close(self, timeout: float = 10.0) -> None:
        if self.queue is not None:
            self.queue.close(timeout)
        self.backend.close()
