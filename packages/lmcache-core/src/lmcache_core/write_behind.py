"""A bounded write-behind queue: lower tiers are written after the engine has moved on.

The engine's store path writes the CPU tier synchronously (a reference to a
pool slot, no copy) and hands the same chunks to this queue for the slower
tiers. The queue holds a reference to each chunk until a background thread
has written it, so the bytes cannot change under the write. It is bounded in
bytes: when full, a chunk is dropped and counted, and the engine is never
blocked by a slow or dead tier.

Chunks waiting here, or being written, are visible to ``contains`` and
``get`` of the tier that owns the queue: a lookup right after a store hits.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lmcache_core.metrics import Metrics

if TYPE_CHECKING:
    from lmcache_core.keys import CacheKey
    from lmcache_core.pool import Chunk

logger = logging.getLogger(__name__)

#: ``write(chunks)``: writes a batch; the queue releases the chunks afterwards.
BatchWriter = Callable[[list["Chunk"]], None]


class WriteBehindQueue:
    def __init__(
        self,
        tier: str,
        write: BatchWriter,
        *,
        max_bytes: int,
        metrics: Metrics | None = None,
        max_batch: int = 8,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"write-behind queue bound must be positive, got {max_bytes}")
        self.tier = tier
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self.metrics = metrics if metrics is not None else Metrics()
        self._write = write
        self._cond = threading.Condition()
        self._pending: dict[CacheKey, Chunk] = {}  # insertion order = write order
        self._inflight: dict[CacheKey, Chunk] = {}
        self._bytes = 0
        self._closed = False
        #: Held while a batch is written: ``remove`` waits on it so a chunk being
        #: written cannot reappear after it was removed.
        self.write_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"lmcache-write-behind-{tier}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ producer side

    def submit(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Queue ``chunks`` (retaining each); False for each one dropped: the queue is full."""
        out: list[bool] = []
        dropped = 0
        with self._cond:
            for chunk in chunks:
                if chunk.key in self._pending or chunk.key in self._inflight:
                    out.append(True)
                    continue
                if self._closed or self._bytes + chunk.nbytes > self.max_bytes:
                    dropped += 1
                    out.append(False)
                    continue
                self._pending[chunk.key] = chunk.retain()
                self._bytes += chunk.nbytes
                out.append(True)
            queued = self._bytes
            self._cond.notify_all()  # flushers wait on it too: notify() could miss the writer
        self.metrics.set("lmcache:write_queue_bytes", queued, tier=self.tier)
        if dropped:
            self.metrics.inc("lmcache:num_dropped_writes", dropped, tier=self.tier)
        return out

    def waiting(self, key: CacheKey) -> Chunk | None:
        """The queued (or in-flight) chunk of ``key``, retained for the caller, or None."""
        with self._cond:
            chunk = self._pending.get(key) or self._inflight.get(key)
            return chunk.retain() if chunk is not None else None

    def holds(self, key: CacheKey) -> bool:
        return key in self._pending or key in self._inflight

    def held_keys(self) -> list[CacheKey]:
        with self._cond:
            return [*self._pending, *self._inflight]

    def cancel(self, keys: Sequence[CacheKey]) -> int:
        """Forget queued writes of ``keys`` (in-flight ones are left to finish)."""
        n = 0
        with self._cond:
            for key in keys:
                chunk = self._pending.pop(key, None)
                if chunk is not None:
                    self._bytes -= chunk.nbytes
                    chunk.release()
                    n += 1
        return n

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most ``timeout`` s), then drop the rest and stop."""
        if not self._closed:
            drained = self.flush(timeout)
            with self._cond:
                self._closed = True
                left = list(self._pending.values())
                self._pending.clear()
                self._bytes = 0
                self._cond.notify_all()
            for chunk in left:
                chunk.release()
            if not drained and left:
                logger.warning(
                    "tier %s: %d queued chunk writes dropped at close", self.tier, len(left)
                )
                self.metrics.inc("lmcache:num_dropped_writes", len(left), tier=self.tier)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch: list[Chunk] = []
                for key in list(itertools.islice(self._pending, self.max_batch)):
                    chunk = self._pending.pop(key)
                    self._inflight[key] = chunk
                    batch.append(chunk)
            with self.write_lock:
                try:
                    self._write(batch)
                except Exception:  # the writer counts and logs its own failures
                    logger.exception("tier %s: write-behind batch failed", self.tier)
                finally:
                    with self._cond:
                        for chunk in batch:
                            self._inflight.pop(chunk.key, None)
                            self._bytes -= chunk.nbytes
                        queued = self._bytes
                        self._cond.notify_all()
            for chunk in batch:
                chunk.release()
            self.metrics.set("lmcache:write_queue_bytes", queued, tier=self.tier)
