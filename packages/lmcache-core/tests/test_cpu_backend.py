"""The CPU DRAM tier runs the whole shipped storage contract."""

from __future__ import annotations

from lmcache_core.backends.cpu import LocalCPUBackend
from lmcache_core.eviction.s3fifo import S3FIFOPolicy
from lmcache_core.metrics import Metrics
from lmcache_core.pool import SlotPool
from lmcache_core.testing import (
    ChunkFactory,
    StorageBackendTests,
    backend_state_machine,
    chunk_payload,
    test_key,
)


def make_cpu(capacity_bytes: int, slot_bytes: int) -> LocalCPUBackend:
    return LocalCPUBackend(SlotPool.anonymous(capacity_bytes, slot_bytes))


def make_cpu_s3fifo(capacity_bytes: int, slot_bytes: int) -> LocalCPUBackend:
    return LocalCPUBackend(SlotPool.anonymous(capacity_bytes, slot_bytes), S3FIFOPolicy())


class TestLocalCPUBackend(StorageBackendTests):
    def make_backend(self, capacity_bytes, slot_bytes):
        return make_cpu(capacity_bytes, slot_bytes)


class TestLocalCPUBackendS3FIFO(StorageBackendTests):
    def make_backend(self, capacity_bytes, slot_bytes):
        return make_cpu_s3fifo(capacity_bytes, slot_bytes)


TestLocalCPUBackendStateful = backend_state_machine(make_cpu).TestCase
TestLocalCPUBackendS3FIFOStateful = backend_state_machine(make_cpu_s3fifo).TestCase


def test_put_of_own_chunk_is_zero_copy():
    backend = make_cpu(4 * 4096, 4096)
    chunk = backend.allocate(test_key(1), 16, 4096)
    chunk.view[:] = chunk_payload(test_key(1), 4096)
    assert backend.put([chunk]) == [True]
    (got,) = backend.get([test_key(1)])
    assert got is chunk  # the same slot, no copy
    got.release()
    chunk.release()
    assert backend.pool.free_slots == 3


def test_allocate_evicts_and_counts():
    metrics = Metrics()
    backend = LocalCPUBackend(SlotPool.anonymous(2 * 4096, 4096), metrics=metrics)
    f = ChunkFactory(4096)
    for i in range(5):
        c = f.make(test_key(i))
        backend.put([c])
        c.release()
    assert metrics.get("lmcache:num_evictions", tier="cpu") == 3
    assert metrics.get("lmcache:usage_bytes", tier="cpu") == 2 * 4096
    assert backend.contains([test_key(3), test_key(4)]) == [True, True]


def test_allocate_returns_none_when_everything_is_in_use():
    metrics = Metrics()
    backend = LocalCPUBackend(SlotPool.anonymous(2 * 4096, 4096), metrics=metrics)
    f = ChunkFactory(4096)
    c0, c1 = f.make(test_key(0)), f.make(test_key(1))
    backend.put([c0, c1])
    readers = backend.get([test_key(0), test_key(1)])
    assert backend.allocate(test_key(9), 1, 4096) is None
    assert metrics.get("lmcache:num_store_skipped_full") == 1
    for r in readers:
        r.release()
    assert backend.allocate(test_key(9), 1, 4096) is not None


def test_expired_pins_are_counted_and_unpinned():
    now = [0.0]
    metrics = Metrics()
    backend = LocalCPUBackend(
        SlotPool.anonymous(2 * 4096, 4096), metrics=metrics, clock=lambda: now[0]
    )
    f = ChunkFactory(4096)
    c = f.make(test_key(0))
    backend.put([c])
    backend.pin([test_key(0)], "req", 10)
    assert backend.pinned_keys() == {test_key(0)}
    assert metrics.get("lmcache:pinned_chunks", tier="cpu") == 1
    now[0] = 11
    assert backend.pinned_keys() == set()
    assert metrics.get("lmcache:num_expired_pins") == 1
    assert metrics.get("lmcache:pinned_chunks", tier="cpu") == 0
    assert backend.unpin("req") == 0


def test_pinned_chunks_gauge_follows_pins_and_unpins():
    metrics = Metrics()
    backend = LocalCPUBackend(SlotPool.anonymous(4 * 4096, 4096), metrics=metrics)
    f = ChunkFactory(4096)
    backend.put([f.make(test_key(i)) for i in range(3)])
    backend.pin([test_key(0), test_key(1)], "a", 10)
    backend.pin([test_key(1), test_key(2), test_key(7)], "b", 10)  # 7 is not held
    assert metrics.get("lmcache:pinned_chunks", tier="cpu") == 3
    backend.unpin("a")
    assert metrics.get("lmcache:pinned_chunks", tier="cpu") == 2
    backend.unpin("b")
    assert metrics.get("lmcache:pinned_chunks", tier="cpu") == 0
