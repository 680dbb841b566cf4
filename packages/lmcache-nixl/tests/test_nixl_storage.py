"""The NIXL storage tier (POSIX plugin, real files): the shipped storage contract and faults."""

from __future__ import annotations

import pytest

pytest.importorskip("nixl")

from lmcache_core.errors import ConfigError
from lmcache_core.testing import (
    ChunkFactory,
    StorageBackendTests,
    backend_state_machine,
    chunk_payload,
    test_key,
)
from lmcache_core.testing.scratch import scratch_file
from lmcache_nixl.storage import NixlStorageBackend


def make(capacity_bytes: int, slot_bytes: int) -> NixlStorageBackend:
    return NixlStorageBackend(scratch_file(),
                              capacity_bytes, slot_bytes)  # fmt: skip


class TestNixlStorageBackend(StorageBackendTests):
    def make_backend(self, capacity_bytes, slot_bytes):
        return make(capacity_bytes, slot_bytes)


class TestNixlStorageBackendAuthenticated(StorageBackendTests):
    def make_backend(self, capacity_bytes, slot_bytes):
        path = scratch_file()
        return NixlStorageBackend(path, capacity_bytes, slot_bytes, authenticate=True)


TestNixlStorageStateful = backend_state_machine(make, max_examples=15).TestCase


@pytest.mark.parametrize("authenticate", [False, True])
def test_bytes_changed_in_the_file_are_a_miss(tmp_path, authenticate):
    f = ChunkFactory(8192)
    b = NixlStorageBackend(tmp_path / "kv.bin", 8 * 8192, 8192, authenticate=authenticate)
    c = f.make(test_key(1))
    assert b.put([c]) == [True]
    c.release()
    with open(tmp_path / "kv.bin", "r+b") as fh:
        fh.seek(b._index[test_key(1)].index * b.slot_stride + 100)
        fh.write(b"\xff\xfe\xfd")
    assert b.get([test_key(1)], f.allocate) == [None]
    assert b.metrics.get("lmcache:num_corrupt_chunks") == 1
    assert b.contains([test_key(1)]) == [False]
    c = f.make(test_key(2))
    b.put([c])
    c.release()
    (g,) = b.get([test_key(2)], f.allocate)
    assert bytes(g.view) == chunk_payload(test_key(2), 8192)
    g.release()
    digest = b._index[test_key(2)].checksum
    if authenticate:  # a keyed MAC bound to the slot and the write, not an xxh3 anyone can make
        view = memoryview(chunk_payload(test_key(2), 8192))
        assert ":" in digest and b._verify(view, digest)
        tag = digest.rsplit(":", 1)[0]
        assert not b._verify(view, f"{tag}0:" + digest.rsplit(":", 1)[1])
        other = NixlStorageBackend(tmp_path / "kv2.bin", 8 * 8192, 8192, authenticate=True)
        assert not other._verify(view, digest)  # another process's key


def test_a_size_that_cannot_hold_a_chunk_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot hold one"):
        NixlStorageBackend(tmp_path / "kv.bin", 100, 8192)
