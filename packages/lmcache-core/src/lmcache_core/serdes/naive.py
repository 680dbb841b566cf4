"""The raw serde ("naive", LMCache's default name): header + the bytes as they are."""

from __future__ import annotations

from lmcache_core.serdes.base import ChunkHeader, Serde, SerdeError


class NaiveSerde(Serde):
    name = "naive"
    serde_id = 0

    def encode(self, key: bytes, num_tokens: int, data: memoryview) -> list[bytes | memoryview]:
        header = ChunkHeader(self.serde_id, num_tokens, data.nbytes, data.nbytes, key)
        return [header.sealed(data).pack(), data]

    def decode(self, frame: bytes | memoryview, key: bytes, out: memoryview) -> int:
        header, payload = ChunkHeader.for_reader(frame, self, key, out.nbytes)
        if header.payload_nbytes != header.raw_nbytes:
            raise SerdeError("a raw frame's payload must be its raw bytes")
        out[:] = payload
        return header.num_tokens
