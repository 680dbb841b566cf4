"""Hostile values in a backend's store: what an attacker or a careless operator leaves there.

Every case must end the same way: a miss, never wrong bytes, never an
exception out of the backend (which would mark the tier unhealthy), and a
fresh ``put`` replaces the bad value. The suite reaches the store *around*
the backend through two hooks a backend's test class implements:

* ``raw_get(backend, key) -> bytes | None``: the stored value, as the store holds it;
* ``raw_set(backend, key, value)``: put any bytes under the key's name;
* ``raw_path(backend, key) -> path`` (backends that keep one file per value):
  the file that holds the key's value, where the suite puts a FIFO;
* ``raw_set_unusable(backend, key)`` (stores with kinds of values): put
  something under the key's name that is not a value at all (a Redis LIST).

A backend whose test class leaves them out skips these tests (say why in the
skip). ``authenticated = True`` on the test class (its backend is built with a
deployment secret) adds the forgery cases, and, for a backend that seals with
``backend.sealer`` (every :class:`~lmcache_core.backends.frame_store.FrameStore`),
frames sealed under another deployment's secret: misses, left in place.

Every case also checks that a hostile value costs a miss of its own chunk
only: the other chunks read in the same batch still hit.
"""

from __future__ import annotations

import os
import threading

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

    def raw_path(self, backend: StorageBackend, key) -> str | os.PathLike[str]:  # type: ignore[no-untyped-def]
        """The file holding ``key``'s value, for a backend that keeps one file per value."""
        raise NotImplementedError

    def raw_set_unusable(self, backend: StorageBackend, key) -> None:  # type: ignore[no-untyped-def]
        """Put something that is not a value under ``key``'s name (a Redis LIST)."""
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

    def _batch(self, backend: StorageBackend, chunks: ChunkFactory, ids: list[int]) -> list:  # type: ignore[type-arg]
        """One ``get`` of ``ids``: each chunk's bytes, or None."""
        out = []
        for c in backend.get([test_key(i) for i in ids], chunks.allocate):
            if c is None:
                out.append(None)
            else:
                out.append(bytes(c.view))
                c.release()
        return out

    def _assert_alone(self, backend: StorageBackend, chunks: ChunkFactory, bad: int) -> None:
        """A batch of ``bad`` between two good chunks: a miss for ``bad`` alone."""
        got = self._batch(backend, chunks, [bad - 1, bad, bad + 1])
        want = [chunk_payload(test_key(i), self.slot_bytes) for i in (bad - 1, bad + 1)]  # type: ignore[attr-defined]
        assert got[1] is None, "a hostile value must be a miss"
        assert [got[0], got[2]] == want, "a hostile value must not fail the rest of its batch"

    def _sealer(self, backend: StorageBackend):  # type: ignore[no-untyped-def]
        if not self.authenticated:
            pytest.skip("backend is not built with a deployment secret")
        sealer = getattr(backend, "sealer", None)
        if sealer is None:
            pytest.skip("backend has no FrameStore sealer to seal a frame of another secret with")
        return sealer

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

    @pytest.mark.conformance
    def test_hostile_fifo_in_place_of_a_value_is_a_miss_not_a_hang(self, backend, chunks):
        """A FIFO (or any file that is not a regular file) where a value's file was: a
        read must neither wait for a writer that never comes nor follow it anywhere."""
        try:
            self.raw_path(backend, test_key(9))
        except NotImplementedError:
            pytest.skip("the test class gives no raw_path: the backend keeps no file per value")
        self._stored(backend, chunks, [9])
        path = os.fspath(self.raw_path(backend, test_key(9)))
        assert os.path.exists(path), "raw_path must name the stored value's file"
        os.unlink(path)
        os.mkfifo(path, 0o600)
        got: list[bytes | None] = []
        reader = threading.Thread(
            target=lambda: got.append(self._read(backend, chunks, 9)),  # type: ignore[attr-defined]
            daemon=True,
        )
        reader.start()
        reader.join(10)
        if reader.is_alive():  # unblock it (a writer opens the FIFO), then fail
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            reader.join(10)
            pytest.fail("a read of a FIFO in place of a value's file waited for a writer")
        assert got == [None], "a FIFO in place of a value must be a miss"
        self._assert_recovers(backend, chunks, 9)  # deleted, or replaced by the fresh put

    @pytest.mark.conformance
    def test_hostile_oversized_value_fails_only_its_own_chunk_in_a_batch(self, backend, chunks):
        self._stored(backend, chunks, [20, 21, 22])
        self._raw(backend, test_key(21))
        self.raw_set(backend, test_key(21), b"\x00" * (4 * self.slot_bytes + (1 << 20)))  # type: ignore[attr-defined]
        self._assert_alone(backend, chunks, 21)
        self._assert_recovers(backend, chunks, 21)

    @pytest.mark.conformance
    def test_hostile_value_of_another_type_is_a_miss_for_it_alone(self, backend, chunks):
        """A value of another kind under one chunk's name (a Redis LIST): that chunk's
        miss, never an error of the batch or of the tier; removed, so a put replaces it."""
        self._stored(backend, chunks, [24, 25, 26])
        try:
            self.raw_set_unusable(backend, test_key(25))
        except NotImplementedError:
            pytest.skip("the test class gives no raw_set_unusable: the store has one kind of value")
        self._assert_alone(backend, chunks, 25)
        self._assert_alone(backend, chunks, 25)  # and again: nothing was marked failing
        self._assert_recovers(backend, chunks, 25)

    @pytest.mark.conformance
    def test_hostile_frame_under_another_secret_is_a_miss_left_in_place(self, backend, chunks):
        """A frame sealed under a secret this instance does not hold (another deployment's,
        a typo, a rotation not rolled out) is a miss, and is never deleted: it may be the
        correctly configured fleet's, and this instance the misconfigured one."""
        from lmcache_core.auth import FrameSealer

        sealer = self._sealer(backend)
        other = FrameSealer(os.urandom(32), encrypt=sealer.encrypt)
        self._stored(backend, chunks, [28, 29, 30])
        key = test_key(29)
        value = self._raw(backend, key)
        inner = bytes(sealer.open(key.to_bytes(), value))
        foreign = b"".join(bytes(p) for p in other.seal(key.to_bytes(), [inner]))
        self.raw_set(backend, key, foreign)
        self._assert_alone(backend, chunks, 29)
        assert self.raw_get(backend, key) == foreign, "another secret's frame must be left alone"
        metrics = getattr(backend, "metrics", None)
        if metrics is not None:
            assert metrics.get("lmcache:num_foreign_chunks", tier=backend.name) >= 1
        # The other way round: this instance misconfigured (another secret) reads the
        # fleet's frames: misses, and the fleet still hits afterwards.
        self._stored(backend, chunks, [32])
        mine = self.raw_get(backend, test_key(32))
        backend.sealer = other  # type: ignore[attr-defined]
        try:
            assert self._read(backend, chunks, 32) is None  # type: ignore[attr-defined]
        finally:
            backend.sealer = sealer  # type: ignore[attr-defined]
        assert self.raw_get(backend, test_key(32)) == mine, "a valid frame must never be deleted"
        assert self._read(backend, chunks, 32) == chunk_payload(test_key(32), self.slot_bytes)  # type: ignore[attr-defined]
