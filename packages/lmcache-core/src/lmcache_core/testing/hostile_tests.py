"""Hostile values in a backend's store: what an attacker or a careless operator leaves there.

Every case must end the same way: a miss, never wrong bytes, never an
exception out of the backend (which would mark the tier unhealthy), and a
fresh ``put`` replaces the bad value. The suite reaches the store *around*
the backend through two hooks a backend's test class implements:

* ``raw_get(backend, key) -> bytes | None``: the stored value, as the store holds it;
* ``raw_set(backend, key, value)``: put any bytes under the key's name.

A backend whose test class leaves them out skips these tests (say why in the
skip). ``authenticated = True`` on the test class (its backend is built with a
deployment secret) adds the forgery cases.
"""

from __future__ import annotations

import os

import pytest

from lmcache_core.backends.base import StorageBackend
from lmcache_core.serdes.naive import NaiveSerde
from lmcache_core.testing.chunks import ChunkFactory, chunk_payload, test_key


def _naive_frame(key, num_tokens: int, data: bytes) -> bytes:  # type: ignore[no-untyped-def]
    """A well-formed raw frame (valid checksum) of ``data`` under ``key``, as anyone can make."""
    return b"".join(
        bytes(p) for p in NaiveSerde().encode(key.to_bytes(), num_tokens, memoryview(data))
    )


class HostileValueTests:
    """Mixed into :class:`~lmcache_core.testing.StorageBackendTests`."""

    #: The backend under test authenticates values with a deployment secret.
    authenticated: bool = False

    def raw_get(self, backend: StorageBackend, key) -> bytes | None:  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def raw_set(self, backend: StorageBackend, key, value: bytes) -> None:  # type: ignore[no-untyped-def]
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def _raw(self, backend: StorageBackend, key):  # type: ignore[no-untyped-def]
        try:
            return self.raw_get(backend, key)
        except NotImplementedError:
            pytest.skip("the test class gives no raw_get/raw_set to tamper with the store")

    def _settle(self, backend: StorageBackend) -> None:
        flush = getattr(backend, "flush", None)
        if flush is not None:
            flush(10)

    def _assert_recovers(self, backend: StorageBackend, chunks: ChunkFactory, i: int) -> None:
        """A miss now, nothing raised; a fresh put replaces the value; other keys unharmed."""
        got = self._read(backend, chunks, i)  # type: ignore[attr-defined]
        assert got is None, "a hostile value must be a miss"
        assert self._put(backend, chunks, [i]) == [True]  # type: ignore[attr-defined]
        self._settle(backend)
        assert self._read(backend, chunks, i) == chunk_payload(test_key(i), self.slot_bytes)  # type: ignore[attr-defined]
        assert self._read(backend, chunks, 1000) == chunk_payload(test_key(1000), self.slot_bytes)  # type: ignore[attr-defined]

    def _stored(self, backend: StorageBackend, chunks: ChunkFactory, ids: list[int]) -> None:
        self._put(backend, chunks, ids + [1000])  # type: ignore[attr-defined]
        self._settle(backend)

    # ------------------------------------------------------------------ the cases

    @pytest.mark.conformance
    def test_hostile_oversized_value_is_a_miss_and_replaced(self, backend, chunks):
        self._stored(backend, chunks, [1])
        self._raw(backend, test_key(1))
        self.raw_set(backend, test_key(1), os.urandom(64) * (self.slot_bytes // 4 + 4096))  # type: ignore[attr-defined]
        self._assert_recovers(backend, chunks, 1)

    @pytest.mark.conformance
    def test_hostile_truncated_value_is_a_miss_and_replaced(self, backend, chunks):
        self._stored(backend, chunks, [2])
        value = self._raw(backend, test_key(2))
        assert value is not None
        self.raw_set(backend, test_key(2), value[: len(value) // 2])
        self._assert_recovers(backend, chunks, 2)

    @pytest.mark.conformance
    def test_hostile_garbage_value_is_a_miss_and_replaced(self, backend, chunks):
        self._stored(backend, chunks, [3])
        value = self._raw(backend, test_key(3))
        assert value is not None
        self.raw_set(backend, test_key(3), os.urandom(len(value)))
        self._assert_recovers(backend, chunks, 3)

    @pytest.mark.conformance
    def test_hostile_swapped_values_are_misses(self, backend, chunks):
        self._stored(backend, chunks, [4, 5])
        a, b = self._raw(backend, test_key(4)), self._raw(backend, test_key(5))
        assert a is not None and b is not None
        self.raw_set(backend, test_key(4), b)
        self.raw_set(backend, test_key(5), a)
        assert self._read(backend, chunks, 5) is None
        self._assert_recovers(backend, chunks, 4)

    @pytest.mark.conformance
    def test_hostile_short_frame_with_a_valid_checksum_is_never_mixed(self, backend, chunks):
        """A well-formed frame of fewer bytes under the key: the backend cannot know the
        chunk's size (the engine checks it against the span), but it must return the
        frame's bytes exactly or nothing, and a fresh put must replace it once removed."""
        self._stored(backend, chunks, [6])
        self._raw(backend, test_key(6))
        short = chunk_payload(test_key(6), self.slot_bytes)[: self.slot_bytes // 2]
        frame = b"".join(
            bytes(p) for p in NaiveSerde().encode(test_key(6).to_bytes(), 8, memoryview(short))
        )
        self.raw_set(backend, test_key(6), frame)
        got = self._read(backend, chunks, 6)  # type: ignore[attr-defined]
        if self.authenticated:
            assert got is None, "an unauthenticated frame must be a miss"
        else:
            assert got in (None, short)
        backend.remove([test_key(6)])
        self._settle(backend)
        assert self._put(backend, chunks, [6]) == [True]  # type: ignore[attr-defined]
        self._settle(backend)
        assert self._read(backend, chunks, 6) == chunk_payload(test_key(6), self.slot_bytes)  # type: ignore[attr-defined]

    @pytest.mark.conformance
    def test_hostile_forged_frame_without_the_secret_is_a_miss(self, backend, chunks):
        if not self.authenticated:
            pytest.skip("backend is not built with a deployment secret")
        self._stored(backend, chunks, [7])
        self._raw(backend, test_key(7))
        forged = b"\xee" * self.slot_bytes  # other KV, in a frame whose checksum is valid
        frame = b"".join(
            bytes(p) for p in NaiveSerde().encode(test_key(7).to_bytes(), 16, memoryview(forged))
        )
        self.raw_set(backend, test_key(7), frame)
        self._assert_recovers(backend, chunks, 7)

    @pytest.mark.conformance
    def test_hostile_tampered_authenticated_frame_is_a_miss(self, backend, chunks):
        if not self.authenticated:
            pytest.skip("backend is not built with a deployment secret")
        self._stored(backend, chunks, [8])
        value = bytearray(self._raw(backend, test_key(8)))
        value[-1] ^= 0x01  # one bit of KV
        self.raw_set(backend, test_key(8), bytes(value))
        self._assert_recovers(backend, chunks, 8)
