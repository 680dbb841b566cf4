"""The naive serde runs the shipped serde contract."""

from __future__ import annotations

import pytest
from lmcache_core.plugins import SERDES, load_plugin
from lmcache_core.serdes.base import ChunkHeader, SerdeError
from lmcache_core.serdes.compressed import LZ4Serde, ZstdSerde
from lmcache_core.serdes.naive import NaiveSerde
from lmcache_core.testing import SerdeTests


class TestNaiveSerde(SerdeTests):
    def make_serde(self):
        return NaiveSerde()


def test_naive_is_found_by_its_lmcache_name():
    assert load_plugin(SERDES, "naive") is NaiveSerde
    assert load_plugin(SERDES, "NAIVE") is NaiveSerde


class TestZstdSerde(SerdeTests):
    def make_serde(self):
        return ZstdSerde()


class TestLZ4Serde(SerdeTests):
    def make_serde(self):
        return LZ4Serde()


@pytest.mark.parametrize("cls", [ZstdSerde, LZ4Serde])
def test_compression_shrinks_compressible_kv_and_round_trips(cls):
    data = bytes(range(256)) * 64  # repetitive, as quantised or padded KV can be
    serde = cls()
    parts = serde.encode(b"k", 3, memoryview(data))
    frame = b"".join(bytes(p) for p in parts)
    assert len(frame) < len(data) // 4
    out = bytearray(len(data))
    assert serde.decode(frame, b"k", memoryview(out)) == 3
    assert bytes(out) == data


@pytest.mark.parametrize("cls", [ZstdSerde, LZ4Serde])
def test_a_value_that_expands_beyond_its_claim_is_refused(cls):
    """A bomb: header claims 100 bytes, the payload expands to 1 MiB."""
    serde = cls()
    big = b"\0" * (1 << 20)
    good = serde.encode(b"k", 1, memoryview(big))
    payload = good[1]
    header = ChunkHeader(serde.serde_id, 1, 100, len(payload), b"k").sealed(payload)
    with pytest.raises(SerdeError):
        serde.decode(header.pack() + bytes(payload), b"k", memoryview(bytearray(100)))


def test_compressed_serdes_are_plugins():
    assert load_plugin(SERDES, "zstd") is ZstdSerde
    assert load_plugin(SERDES, "lz4") is LZ4Serde
