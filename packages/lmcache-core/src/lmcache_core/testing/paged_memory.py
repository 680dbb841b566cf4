"""``PagedKVMemory``: an engine's paged KV memory in numpy, for tests of the cache engine.

It stands where vLLM's or SGLang's KV tensors stand in production: random,
never-zero bytes in per-layer arrays of the layout's shape, plus block tables
for requests. Tests store from one and retrieve into another, then compare.
"""

from __future__ import annotations

import numpy as np

from lmcache_core.layout import KVLayout
from lmcache_core.transfer import ChunkIO
from lmcache_core.transfer_numpy import NumpyPagedKV, layer_shape


class PagedKVMemory:
    """Paged KV memory of one engine, with requests' block tables."""

    def __init__(self, layout: KVLayout, num_blocks: int = 64, seed: int = 0) -> None:
        self.layout = layout
        rng = np.random.default_rng(seed)
        self.layers = [
            rng.integers(1, 2**16, size=layer_shape(layout, num_blocks), dtype=np.uint16)
            for _ in range(layout.num_layers)
        ]
        self.num_blocks = num_blocks

    def table(self, ntok: int, seed: int) -> list[int]:
        need = -(-ntok // self.layout.block_size)
        return list(np.random.default_rng(seed).permutation(self.num_blocks)[:need])

    def kv(self, table) -> NumpyPagedKV:
        return NumpyPagedKV(self.layout, self.layers, table)

    def tokens_kv(self, table, start: int, end: int) -> bytes:
        buf = bytearray(self.layout.chunk_bytes(end - start))
        self.kv(table).read_chunks([ChunkIO(start, end, memoryview(buf))])
        return bytes(buf)
