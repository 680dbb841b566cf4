"""``StorageBackendTests``: the storage contract, as a pytest class to subclass."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from lmcache_core.backends.base import StorageBackend
from lmcache_core.testing.chunks import ChunkFactory, chunk_payload, test_key
from lmcache_core.testing.hostile_tests import HostileValueTests


class StorageBackendTests(HostileValueTests):
    """Subclass as ``TestX(StorageBackendTests)`` and implement :meth:`make_backend`.

    Tests of optional capabilities skip themselves when the backend's
    ``capabilities`` say it lacks them. Implement ``raw_get``/``raw_set`` too
    and the hostile-value cases (:mod:`lmcache_core.testing.hostile_tests`) run.
    """

    #: Size of a full chunk in the tests.
    slot_bytes: int = 8192
    #: Capacity of the backend under test, in full chunks.
    capacity_chunks: int = 8

    def make_backend(self, capacity_bytes: int, slot_bytes: int) -> StorageBackend:
        raise NotImplementedError("implement make_backend(capacity_bytes, slot_bytes)")

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture
    def backend(self) -> Iterator[StorageBackend]:
        b = self.make_backend(self.capacity_chunks * self.slot_bytes, self.slot_bytes)
        yield b
        b.close()

    @pytest.fixture
    def chunks(self) -> Iterator[ChunkFactory]:
        f = ChunkFactory(self.slot_bytes)
        yield f
        f.close()

    def _put(self, backend: StorageBackend, chunks: ChunkFactory, ids, nbytes=None) -> list[bool]:
        made = [chunks.make(test_key(i), nbytes) for i in ids]
        try:
            return backend.put(made)
        finally:
            for c in made:
                c.release()

    def _read(self, backend: StorageBackend, chunks: ChunkFactory, i: int) -> bytes | None:
        (c,) = backend.get([test_key(i)], chunks.allocate)
        if c is None:
            return None
        try:
            return bytes(c.view)
        finally:
            c.release()

    # ------------------------------------------------------------------ basics

    @pytest.mark.conformance
    def test_empty_backend_contains_nothing(self, backend, chunks):
        assert backend.contains([test_key(i) for i in range(5)]) == [False] * 5
        assert backend.get([test_key(1)], chunks.allocate) == [None]
        assert backend.used_bytes == 0

    @pytest.mark.conformance
    def test_put_then_get_returns_exact_bytes(self, backend, chunks):
        sizes = [self.slot_bytes, self.slot_bytes // 2 + 3, 1]
        for i, n in enumerate(sizes):
            assert self._put(backend, chunks, [i], n) == [True]
        for i, n in enumerate(sizes):
            assert self._read(backend, chunks, i) == chunk_payload(test_key(i), n)

    @pytest.mark.conformance
    def test_get_keeps_order_and_reports_misses_in_place(self, backend, chunks):
        self._put(backend, chunks, [1, 3])
        got = backend.get([test_key(i) for i in (0, 1, 2, 3)], chunks.allocate)
        try:
            assert [c is not None for c in got] == [False, True, False, True]
            assert bytes(got[1].view) == chunk_payload(test_key(1), self.slot_bytes)
            assert bytes(got[3].view) == chunk_payload(test_key(3), self.slot_bytes)
            assert got[1].key == test_key(1)
        finally:
            for c in got:
                if c is not None:
                    c.release()
        assert backend.contains([test_key(i) for i in (0, 1, 2, 3)]) == [False, True, False, True]

    @pytest.mark.conformance
    def test_put_of_stored_key_keeps_the_original(self, backend, chunks):
        self._put(backend, chunks, [7])
        other = chunks.make(test_key(7))
        other.view[:] = b"\x01" * self.slot_bytes
        try:
            assert backend.put([other]) == [True]
        finally:
            other.release()
        assert self._read(backend, chunks, 7) == chunk_payload(test_key(7), self.slot_bytes)

    @pytest.mark.conformance
    def test_remove(self, backend, chunks):
        self._put(backend, chunks, [1, 2])
        assert backend.remove([test_key(1), test_key(9)]) == 1
        assert backend.contains([test_key(1), test_key(2)]) == [False, True]
        assert self._read(backend, chunks, 1) is None
        assert backend.remove([test_key(1)]) == 0

    @pytest.mark.conformance
    def test_chunk_held_by_a_reader_survives_removal_and_reuse(self, backend, chunks):
        self._put(backend, chunks, [0])
        (held,) = backend.get([test_key(0)], chunks.allocate)
        assert held is not None
        try:
            backend.remove([test_key(0)])
            # Churn through the backend's memory so a freed slot would be reused.
            for i in range(100, 100 + 2 * self.capacity_chunks):
                self._put(backend, chunks, [i])
            assert bytes(held.view) == chunk_payload(test_key(0), self.slot_bytes)
        finally:
            held.release()

    @pytest.mark.conformance
    def test_usage_accounting(self, backend, chunks):
        if not backend.capabilities.exact_usage:
            pytest.skip("backend is shared: its usage is not this process's alone")
        assert backend.capacity_bytes >= self.slot_bytes
        self._put(backend, chunks, [1], 100)
        self._put(backend, chunks, [2], 200)
        assert backend.used_bytes == 300
        backend.remove([test_key(1)])
        assert backend.used_bytes == 200
        assert backend.used_bytes <= backend.capacity_bytes

    @pytest.mark.conformance
    def test_listing(self, backend, chunks):
        if not backend.capabilities.listing:
            pytest.skip("backend does not list keys")
        self._put(backend, chunks, [4, 5, 6])
        assert set(backend.keys()) == {test_key(i) for i in (4, 5, 6)}

    @pytest.mark.conformance
    def test_close_is_idempotent(self, backend):
        backend.close()
        backend.close()

    # ------------------------------------------------------------------ eviction and pins

    @pytest.mark.conformance
    def test_overfilling_evicts_but_never_returns_wrong_bytes(self, backend, chunks):
        if not backend.capabilities.evicts:
            pytest.skip("backend does not evict")
        n = 3 * self.capacity_chunks
        for i in range(n):
            assert self._put(backend, chunks, [i]) == [True]
            assert backend.used_bytes <= backend.capacity_bytes
        present = backend.contains([test_key(i) for i in range(n)])
        assert present[-1], "the chunk stored last must still be there"
        assert sum(present) <= self.capacity_chunks
        for i in range(n):
            data = self._read(backend, chunks, i)
            assert data is None or data == chunk_payload(test_key(i), self.slot_bytes)

    @pytest.mark.conformance
    def test_pins_protect_from_eviction(self, backend, chunks):
        if not (backend.capabilities.pinning and backend.capabilities.evicts):
            pytest.skip("backend does not pin or does not evict")
        self._put(backend, chunks, [0, 1])
        assert backend.pin([test_key(0), test_key(1), test_key(99)], "req-a", 1000) == 2
        for i in range(10, 10 + 3 * self.capacity_chunks):
            self._put(backend, chunks, [i])
        assert backend.contains([test_key(0), test_key(1)]) == [True, True]
        assert self._read(backend, chunks, 0) == chunk_payload(test_key(0), self.slot_bytes)

    @pytest.mark.conformance
    def test_fully_pinned_backend_refuses_new_chunks(self, backend, chunks):
        if not (backend.capabilities.pinning and backend.capabilities.evicts):
            pytest.skip("backend does not pin or does not evict")
        ids = list(range(self.capacity_chunks))
        self._put(backend, chunks, ids)
        backend.pin([test_key(i) for i in ids], "req-a", 1000)
        assert self._put(backend, chunks, [500]) == [False]
        assert all(backend.contains([test_key(i) for i in ids]))
        assert backend.unpin("req-a") == len(ids)
        assert self._put(backend, chunks, [500]) == [True]

    @pytest.mark.conformance
    def test_pins_left_behind_expire(self, backend, chunks):
        if not (backend.capabilities.pinning and backend.capabilities.evicts):
            pytest.skip("backend does not pin or does not evict")
        ids = list(range(self.capacity_chunks))
        self._put(backend, chunks, ids)
        backend.pin([test_key(i) for i in ids], "abandoned", 0.05)
        time.sleep(0.1)
        assert self._put(backend, chunks, [500]) == [True]

    # ------------------------------------------------------------------ concurrency

    @pytest.mark.conformance
    def test_concurrent_callers_never_see_wrong_bytes(self, backend, chunks):
        errors: list[str] = []
        deadline = time.monotonic() + 2.0
        universe = 2 * self.capacity_chunks

        def worker(seed: int) -> None:
            import random

            rnd = random.Random(seed)
            ops = 0
            while time.monotonic() < deadline and ops < 400 and not errors:
                ops += 1
                i = rnd.randrange(universe)
                op = rnd.random()
                try:
                    if op < 0.45:
                        self._put(backend, chunks, [i])
                    elif op < 0.9:
                        data = self._read(backend, chunks, i)
                        if data is not None and data != chunk_payload(test_key(i), self.slot_bytes):
                            errors.append(f"wrong bytes for key {i}")
                    else:
                        backend.remove([test_key(i)])
                except Exception as e:  # pragma: no cover - reported below
                    errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:5]
        assert backend.used_bytes <= backend.capacity_bytes
