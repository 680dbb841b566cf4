"""Compressing serdes for remote tiers (``remote_serde: zstd`` or ``lz4``).

Worth it where the network, not the CPU, is the limit (a shared Redis or S3
across hosts). The frame header carries the raw size; the checksum covers
the stored (compressed) bytes and is checked before decompressing, so any
flipped bit shows and a corrupt value costs no decompression. Decompression is
bounded by the size the reader expects: a value that claims or expands to more
is refused before memory is touched.
"""

from __future__ import annotations

from typing import Any

from lmcache_core.errors import PluginNotFoundError
from lmcache_core.serdes.base import ChunkHeader, Serde, SerdeError


def _require(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise PluginNotFoundError(
            f"the {module.split('.')[0]} serde needs its library: pip install "
            "'lmcache[compression]'"
        ) from None


class _CompressedSerde(Serde):
    def _compress(self, data: memoryview) -> bytes:
        raise NotImplementedError

    def _decompress(self, payload: memoryview, raw_nbytes: int) -> bytes:
        raise NotImplementedError

    def encode(self, key: bytes, num_tokens: int, data: memoryview) -> list[bytes | memoryview]:
        payload = self._compress(data)
        header = ChunkHeader(self.serde_id, num_tokens, data.nbytes, len(payload), key)
        return [header.sealed(payload).pack(), payload]

    def decode(self, frame: bytes | memoryview, key: bytes, out: memoryview) -> int:
        header, payload = ChunkHeader.for_reader(frame, self, key, out.nbytes)
        try:
            raw = self._decompress(payload, header.raw_nbytes)
        except SerdeError:
            raise
        except Exception as e:
            raise SerdeError(f"{self.name} payload does not decompress: {e}") from None
        if len(raw) != header.raw_nbytes:
            raise SerdeError(f"payload expands to {len(raw)} bytes, not {header.raw_nbytes}")
        out[:] = raw
        return header.num_tokens


class ZstdSerde(_CompressedSerde):
    name = "zstd"
    serde_id = 1

    def __init__(self, level: int = 1) -> None:
        self._zstd = _require("zstandard")
        self.level = level

    def _compress(self, data: memoryview) -> bytes:
        return self._zstd.ZstdCompressor(level=self.level).compress(data)

    def _decompress(self, payload: memoryview, raw_nbytes: int) -> bytes:
        # max_output_size bounds the work a hostile value can cause.
        return self._zstd.ZstdDecompressor().decompress(payload, max_output_size=raw_nbytes)


class LZ4Serde(_CompressedSerde):
    name = "lz4"
    serde_id = 2

    def __init__(self) -> None:
        self._block = _require("lz4.block")

    def _compress(self, data: memoryview) -> bytes:
        return self._block.compress(data, store_size=False)

    def _decompress(self, payload: memoryview, raw_nbytes: int) -> bytes:
        return self._block.decompress(payload, uncompressed_size=raw_nbytes)
