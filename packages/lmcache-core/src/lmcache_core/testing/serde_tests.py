"""``SerdeTests``: a serde must round-trip exactly and reject every corrupt frame."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_core.serdes.base import Serde, SerdeError

#: The suite is subclassed once per serde; each subclass runs the same pure test.
_SUBCLASSED = [HealthCheck.differing_executors]


def _frame(serde: Serde, key: bytes, data: bytes, ntok: int = 7) -> bytes:
    return b"".join(bytes(p) for p in serde.encode(key, ntok, memoryview(data)))


class SerdeTests:
    """Subclass and implement :meth:`make_serde`."""

    def make_serde(self) -> Serde:
        raise NotImplementedError("implement make_serde()")

    @pytest.mark.conformance
    @settings(max_examples=50, deadline=None, suppress_health_check=_SUBCLASSED)
    @given(
        data=st.binary(min_size=1, max_size=4096),
        key=st.binary(min_size=1, max_size=64),
        ntok=st.integers(0, 2**31),
    )
    def test_round_trip(self, data, key, ntok):
        serde = self.make_serde()
        out = bytearray(len(data))
        assert serde.decode(_frame(serde, key, data, ntok), key, memoryview(out)) == ntok
        assert bytes(out) == data

    @pytest.mark.conformance
    @settings(max_examples=50, deadline=None, suppress_health_check=_SUBCLASSED)
    @given(
        data=st.binary(min_size=16, max_size=2048), pos=st.integers(0, 10**6), bit=st.integers(0, 7)
    )
    def test_any_flipped_bit_is_detected(self, data, pos, bit):
        serde = self.make_serde()
        frame = bytearray(_frame(serde, b"k", data))
        frame[pos % len(frame)] ^= 1 << bit
        out = bytearray(len(data))
        with pytest.raises(SerdeError):
            serde.decode(bytes(frame), b"k", memoryview(out))

    @pytest.mark.conformance
    @settings(max_examples=30, deadline=None, suppress_health_check=_SUBCLASSED)
    @given(data=st.binary(min_size=1, max_size=2048), cut=st.integers(0, 10**6))
    def test_truncated_frames_are_rejected(self, data, cut):
        serde = self.make_serde()
        frame = _frame(serde, b"key", data)
        out = bytearray(len(data))
        with pytest.raises(SerdeError):
            serde.decode(frame[: cut % len(frame)], b"key", memoryview(out))

    @pytest.mark.conformance
    def test_frame_of_another_key_is_rejected(self):
        serde = self.make_serde()
        out = bytearray(100)
        with pytest.raises(SerdeError):
            serde.decode(_frame(serde, b"key-a", b"x" * 100), b"key-b", memoryview(out))

    @pytest.mark.conformance
    def test_frame_larger_than_the_reader_expects_is_rejected(self):
        serde = self.make_serde()
        out = bytearray(10)
        with pytest.raises(SerdeError):
            serde.decode(_frame(serde, b"k", b"x" * 100), b"k", memoryview(out))

    @pytest.mark.conformance
    def test_garbage_is_rejected(self):
        serde = self.make_serde()
        out = bytearray(10)
        for garbage in (b"", b"\x00" * 64, b"LMCK" + b"\xff" * 60):
            with pytest.raises(SerdeError):
                serde.decode(garbage, b"k", memoryview(out))
