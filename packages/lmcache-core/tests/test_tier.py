"""ManagedTier: health with backoff, write-behind, and the storage contract on top of both."""

from __future__ import annotations

import threading
import time

from lmcache_core.backends.disk import LocalDiskBackend
from lmcache_core.health import TierHealth
from lmcache_core.metrics import Metrics
from lmcache_core.testing import (
    ChunkFactory,
    StorageBackendTests,
    backend_state_machine,
    chunk_payload,
    test_key,
)
from lmcache_core.testing.scratch import scratch_dir
from lmcache_core.testing.settled import SettledWrites
from lmcache_core.tier import ManagedTier


def _disk(capacity_bytes: int) -> LocalDiskBackend:
    return LocalDiskBackend(scratch_dir(), capacity_bytes)


def settled(cap: int) -> SettledWrites:
    """Write-behind, each put waiting for its write: the suites check final states."""
    return SettledWrites(ManagedTier(_disk(cap), write_behind_bytes=1 << 20))


class TestManagedTierSync(StorageBackendTests):
    def make_backend(self, capacity_bytes, slot_bytes):
        return ManagedTier(_disk(capacity_bytes))


class TestManagedTierWriteBehind(StorageBackendTests):
    def make_backend(self, capacity_bytes, slot_bytes):
        return settled(capacity_bytes)


TestManagedTierStateful = backend_state_machine(
    lambda cap, slot: settled(cap), max_examples=20
).TestCase


# --------------------------------------------------------------------------- test doubles


class SwitchableBackend(LocalDiskBackend):
    """A disk tier that can be switched "down" (every call raises), as a dead server would."""

    down = False
    gate: threading.Event | None = None

    def _check(self):
        if self.down:
            raise ConnectionError("tier is down (test)")

    def contains(self, keys):
        self._check()
        return super().contains(keys)

    def get(self, keys, allocator):
        self._check()
        return super().get(keys, allocator)

    def put(self, chunks):
        if self.gate is not None:
            self.gate.wait(10)
        self._check()
        return super().put(chunks)


def _store(tier, factory, ids, nbytes=4096):
    for i in ids:
        c = factory.make(test_key(i), nbytes)
        try:
            tier.put([c])
        finally:
            c.release()


# --------------------------------------------------------------------------- health


def test_health_backs_off_probes_once_and_rejoins():
    now = [0.0]
    m = Metrics()
    h = TierHealth("t", m, base_backoff_s=1.0, max_backoff_s=4.0, clock=lambda: now[0])
    assert h.available()
    h.failed("get", ConnectionError("x"))
    assert not h.healthy and not h.available()
    now[0] = 1.0
    assert h.available(), "one probe after the backoff"
    assert not h.available(), "only one caller probes"
    h.failed("get")  # probe failed: backoff doubles
    now[0] = 2.5
    assert not h.available()
    now[0] = 3.0
    assert h.available()
    h.succeeded()
    assert h.healthy and h.available()
    assert m.get("lmcache:tier_healthy", tier="t", path="all") == 1
    assert m.get("lmcache:num_failures") == 2
    assert m.get("lmcache:num_skipped_unhealthy") >= 2


def test_backoff_is_bounded():
    now = [0.0]
    h = TierHealth("t", base_backoff_s=1.0, max_backoff_s=4.0, clock=lambda: now[0])
    for _ in range(10):
        h.failed("put")
    now[0] += 4.0
    assert h.available()


def test_a_dead_tier_is_a_miss_then_skipped_then_rejoins():
    f = ChunkFactory(4096)
    backend = SwitchableBackend(scratch_dir(), 1 << 20)
    m = Metrics()
    tier = ManagedTier(backend, metrics=m, base_backoff_s=0.05, max_backoff_s=0.05)
    _store(tier, f, [1])
    backend.down = True
    assert tier.contains([test_key(1)]) == [False]
    assert tier.get([test_key(1)], f.allocate) == [None]  # skipped: unhealthy
    assert m.get("lmcache:num_skipped_unhealthy", tier="disk", op="get") == 1
    assert not tier.healthy
    _store(tier, f, [2])  # writes fail too, never raise
    assert m.get("lmcache:num_dropped_writes", tier="disk") >= 1
    backend.down = False
    time.sleep(0.06)
    assert tier.contains([test_key(1)]) == [True]  # the probe answers: healthy again
    (c,) = tier.get([test_key(1)], f.allocate)
    assert c is not None and bytes(c.view) == chunk_payload(test_key(1), 4096)
    c.release()
    tier.close()


# --------------------------------------------------------------------------- write-behind


def test_write_behind_returns_at_once_and_drops_when_full():
    f = ChunkFactory(4096)
    backend = SwitchableBackend(scratch_dir(), 1 << 20)
    backend.gate = threading.Event()  # the tier hangs until released
    m = Metrics()
    tier = ManagedTier(backend, metrics=m, write_behind_bytes=4 * 4096)
    t0 = time.monotonic()
    c = [f.make(test_key(i)) for i in range(10)]
    accepted = tier.put(c)
    for x in c:
        x.release()
    assert time.monotonic() - t0 < 1.0, "put must not wait for a hung tier"
    # One batch may be in flight already; the queue holds at most 4 chunks' bytes.
    assert 1 <= sum(accepted) <= 4
    assert m.get("lmcache:num_dropped_writes", tier="disk") == 10 - sum(accepted)
    # Queued chunks are visible (and readable) before they are written.
    first = [i for i, ok in enumerate(accepted) if ok]
    assert tier.contains([test_key(first[0])]) == [True]
    (got,) = tier.get([test_key(first[0])], f.allocate)
    assert bytes(got.view) == chunk_payload(test_key(first[0]), 4096)
    got.release()
    backend.gate.set()
    assert tier.flush(10)
    assert backend.contains([test_key(i) for i in first]) == [True] * len(first)
    assert tier.queue.queued_bytes == 0
    tier.close()
    assert f.pool.free_slots == f.pool.num_slots, "every queued chunk was released"


def test_remove_of_a_chunk_being_written_sticks():
    f = ChunkFactory(4096)
    backend = SwitchableBackend(scratch_dir(), 1 << 20)
    backend.gate = threading.Event()
    tier = ManagedTier(backend, write_behind_bytes=1 << 20)
    _store(tier, f, [1, 2])
    time.sleep(0.05)  # the writer has taken both and waits at the gate
    done = threading.Event()

    def remove():
        tier.remove([test_key(1), test_key(2)])
        done.set()

    t = threading.Thread(target=remove)
    t.start()
    time.sleep(0.05)
    assert not done.is_set(), "remove waits for the write in flight"
    backend.gate.set()
    t.join(5)
    assert tier.contains([test_key(1), test_key(2)]) == [False, False]
    assert backend.contains([test_key(1), test_key(2)]) == [False, False]
    tier.close()


def test_close_writes_what_is_queued():
    f = ChunkFactory(4096)
    root = scratch_dir()
    tier = ManagedTier(LocalDiskBackend(root, 1 << 20), write_behind_bytes=1 << 20)
    _store(tier, f, range(6))
    tier.close()
    again = LocalDiskBackend(root, 1 << 20)
    assert again.contains([test_key(i) for i in range(6)]) == [True] * 6


class HangingBackend(LocalDiskBackend):
    """A disk tier whose reads (or removes) wait until released: a hung mount, a FIFO."""

    hang: threading.Event | None = None

    def _wait(self):
        if self.hang is not None:
            self.hang.wait(30)

    def get(self, keys, allocator):
        got = super().get(keys, allocator)  # it has allocated chunks: a late answer holds them
        self._wait()
        return got

    def remove(self, keys):
        self._wait()
        return super().remove(keys)


def test_blocking_timeout_bounds_every_call_to_a_hung_tier():
    """A backend that never answers costs the first call ``blocking_timeout_secs``, the
    next ones nothing (misses at once while it still hangs); what it returns late is
    released; it rejoins once it answers."""
    f = ChunkFactory(4096)
    backend = HangingBackend(scratch_dir(), 1 << 20)
    m = Metrics()
    tier = ManagedTier(backend, metrics=m, timeout_s=0.3, base_backoff_s=0.05, max_backoff_s=0.05)
    _store(tier, f, [1, 2])
    backend.hang = threading.Event()
    t0 = time.monotonic()
    assert tier.get([test_key(1)], f.allocate) == [None]
    assert 0.25 < time.monotonic() - t0 < 2.0, "the call waited about blocking_timeout_secs"
    assert not tier.read_health.healthy
    assert m.get("lmcache:num_failures", tier="disk", op="get") == 1
    time.sleep(0.1)  # past the backoff: without the late call, this would be the probe
    t0 = time.monotonic()
    assert tier.get([test_key(2)], f.allocate) == [None]
    assert time.monotonic() - t0 < 0.2, "calls while the late one runs must not wait again"
    t0 = time.monotonic()
    assert tier.remove([test_key(1)]) == 0  # the write path: bounded the same way
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert f.pool.free_slots < f.pool.num_slots  # the hung get holds a chunk...
    backend.hang.set()
    deadline = time.monotonic() + 5
    while f.pool.free_slots < f.pool.num_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert f.pool.free_slots == f.pool.num_slots, "...released when it ends"
    backend.hang = None
    time.sleep(0.1)
    (c,) = tier.get([test_key(2)], f.allocate)  # the probe: answers, and the tier rejoins
    assert c is not None and bytes(c.view) == chunk_payload(test_key(2), 4096)
    c.release()
    assert tier.read_health.healthy
    tier.close()


def test_contains_of_an_in_memory_index_is_called_inline():
    backend = HangingBackend(scratch_dir(), 1 << 20)
    tier = ManagedTier(backend)
    tier.contains([test_key(1)])
    assert tier._calls is None, "the disk tier's contains reads its index: no thread hop"
    tier.close()
