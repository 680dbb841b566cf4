"""``ManagedTier``: a lower tier as the cache engine uses it.

Wraps any :class:`~lmcache_core.backends.base.StorageBackend` (disk, Redis,
S3, a third party's) with what every lower tier needs and no backend should
have to write itself:

* failures never reach the engine: an exception is counted, the tier's read or
  write path is marked unhealthy (:class:`~lmcache_core.health.TierHealth`)
  and skipped with backoff, and the call answers as a miss;
* writes go behind (:class:`~lmcache_core.write_behind.WriteBehindQueue`):
  ``put`` queues and returns at once; a full queue drops and counts;
* every call the engine waits on is time-bound: ``contains``, ``get``,
  ``remove`` and a synchronous ``put`` run on the tier's call threads and are
  waited for at most ``timeout_s`` (``blocking_timeout_secs``). A call past
  it is a failure of its path (a miss now, skipped with backoff), and while it
  still runs every later call on that path is a miss at once; what it returns
  when it ends is released. A backend that hangs (a hung mount, a FIFO, a
  server that accepts and never answers) costs one request ``timeout_s``, never
  the engine.

It is itself a ``StorageBackend``, so it passes the same conformance suite.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, TypeVar

from lmcache_core.backends.base import BackendCapabilities, ChunkAllocator, StorageBackend
from lmcache_core.health import TierHealth
from lmcache_core.metrics import Metrics
from lmcache_core.write_behind import WriteBehindQueue

if TYPE_CHECKING:
    from lmcache_core.keys import CacheKey
    from lmcache_core.pool import Chunk

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Most threads per tier that run the calls the engine waits on. They are made as
#: concurrent callers need them (the scheduler's lookups, the workers' loads, an lmcache
#: server's sessions; a call may make one more, a demotion from a get's allocation).
CALL_THREADS = 32
#: Set on a tier's call threads: a call made from one (nested) runs inline.
_on_call_thread = threading.local()


def _mark_call_thread() -> None:
    _on_call_thread.active = True


class TierTimeout(TimeoutError):
    """A tier call took longer than ``blocking_timeout_secs``: a failure of its path."""


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
        self._calls: ThreadPoolExecutor | None = None
        self._calls_lock = threading.Lock()
        #: Calls of each path ("read", "write") past their deadline and still running.
        self._late = {"read": 0, "write": 0}
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
        if rest and self._may_call("read", "contains"):
            try:
                found = self._bounded("read", "contains", self.backend.contains,
                                      [keys[i] for i in rest])  # fmt: skip
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
        if rest and self._may_call("read", "get"):
            try:
                got = self._bounded(
                    "read", "get", self.backend.get, [keys[i] for i in rest], allocator,
                    late=_release_chunks,
                )  # fmt: skip
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
        if not self._may_call("write", "put"):
            self.metrics.inc("lmcache:num_dropped_writes", len(chunks), tier=self.name)
            return [False] * len(chunks)
        try:
            if self.queue is not None:  # the writer thread: nobody waits on it
                ok = self.backend.put(chunks)
            else:  # the caller waits: bounded, its chunks held until the call ends
                held = [c.retain() for c in chunks]
                ok = self._bounded(
                    "write", "put", self.backend.put, chunks, done=lambda: _release_chunks(held)
                )
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
        if not self._may_call("write", "remove"):
            return 0
        try:
            n = self._bounded("write", "remove", self.backend.remove, keys)
        except Exception as e:
            self.write_health.failed("remove", e)
            return 0
        self.write_health.succeeded()
        return n

    # ------------------------------------------------------------------ time bounds

    def _may_call(self, path: str, op: str) -> bool:
        """May ``op`` go to the backend now: its path is healthy (or this is the probe) and
        no call of the path is still running past its deadline (that one is the probe)."""
        if self._late[path]:
            self.metrics.inc("lmcache:num_skipped_unhealthy", tier=self.name, op=op)
            return False
        health = self.read_health if path == "read" else self.write_health
        return health.available(op)

    def _bounded(
        self,
        path: str,
        op: str,
        fn: Callable[..., T],
        *args: Any,
        late: Callable[[Any], None] | None = None,
        done: Callable[[], None] | None = None,
    ) -> T:
        """``fn(*args)`` on the tier's call threads, waited for at most ``timeout_s``.

        Past the deadline it raises :class:`TierTimeout` (the caller marks the path
        failed) and the call is left to finish: ``late`` gets what it returns then
        (a get's chunks, released), and the path's calls are misses until it ends.
        ``done`` runs when the call ends, in time or late.
        """
        if op in self.backend.inline_ops or getattr(_on_call_thread, "active", False):
            # Answered from memory; or already on a call thread, so already bounded (a
            # get's allocation demoting an evicted chunk): waiting could only deadlock.
            try:
                return fn(*args)
            finally:
                if done is not None:
                    done()
        calls = self._calls
        if calls is None:
            with self._calls_lock:
                if self._calls is None:
                    self._calls = ThreadPoolExecutor(
                        CALL_THREADS,
                        thread_name_prefix=f"lmcache-{self.name}-call",
                        initializer=_mark_call_thread,
                    )
                calls = self._calls
        future = calls.submit(fn, *args)
        try:
            result = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            with self._calls_lock:
                self._late[path] += 1
            future.add_done_callback(lambda f: self._ended_late(path, f, late, done))
            raise TierTimeout(
                f"{op} took longer than {self.timeout_s:g} s (blocking_timeout_secs); its "
                "answer is dropped when it comes"
            ) from None
        except BaseException:
            if done is not None:
                done()
            raise
        if done is not None:
            done()
        return result

    def _ended_late(
        self,
        path: str,
        future: Future[Any],
        late: Callable[[Any], None] | None,
        done: Callable[[], None] | None,
    ) -> None:
        try:
            if late is not None and not future.cancelled() and future.exception() is None:
                late(future.result())
        except Exception:
            logger.warning("%s tier: releasing a late answer failed", self.name, exc_info=True)
        finally:
            if done is not None:
                done()
            with self._calls_lock:
                self._late[path] -= 1
        logger.info("%s tier: a %s call past its deadline ended", self.name, path)

    # ------------------------------------------------------------------ flush

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
        if self._calls is not None:
            self._calls.shutdown(wait=False)  # a call still hung keeps its thread, not us
        self.backend.close()


def _release_chunks(chunks: Any) -> None:
    """Release what a late ``get`` (or a bounded ``put``) holds."""
    for c in chunks or ():
        if c is not None:
            c.release()
