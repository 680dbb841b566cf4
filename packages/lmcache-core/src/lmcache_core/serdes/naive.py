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
        frame = memoryview(frame).cast("B")
        header = ChunkHeader.unpack(frame, max_raw_nbytes=out.nbytes)
        if header.serde_id != self.serde_id:
            raise SerdeError(f"frame was written by serde id {header.serde_id}, not {self.name}")
        if header.key != key:
            raise SerdeError("frame was stored under another key")
        if header.raw_nbytes != out.nbytes or header.payload_nbytes != header.raw_nbytes:
            raise SerdeError(
                f"frame holds {header.raw_nbytes} bytes, the reader expects {out.nbytes}"
            )
        payload = frame[header.size :]
        if payload.nbytes != header.payload_nbytes:
            raise SerdeError(
                f"frame is truncated: {payload.nbytes} of {header.payload_nbytes} payload bytes"
            )
        header.verify(payload)
        out[:] = payload
        return header.num_tokens
