"""The transfer protocol: moving KV between an engine's memory and chunk buffers.

The cache engine never touches engine memory itself. The adapter hands it a
:class:`KVReader` when storing and a :class:`KVWriter` when retrieving; these
gather from / scatter into the engine's paged KV (lmcache-cuda's kernels, or
the numpy reference in :mod:`lmcache_core.transfer_numpy`). Calls are batched
per request so a GPU implementation can launch one kernel for many chunks.

Chunk buffers hold bytes in the layout's chunk format
(:mod:`lmcache_core.layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ChunkIO:
    """One chunk to move: tokens ``[start, end)`` of the request and their buffer.

    When writing back, tokens before ``write_from`` are already in the
    engine's memory (its own prefix cache hit) and must not be written;
    implementations may skip them at their own granularity (a whole block
    whose tokens are all before ``write_from``).
    """

    start: int
    end: int
    buffer: memoryview
    write_from: int = 0

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@runtime_checkable
class KVReader(Protocol):
    """Reads a request's KV out of engine memory (used by ``CacheEngine.store``)."""

    def read_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        """Fill each ``chunk.buffer`` with the KV of its tokens, in chunk format.

        Must not return before the bytes are in the buffers (a GPU reader
        synchronises its stream). Raises on failure; nothing is stored then.
        """


@runtime_checkable
class KVWriter(Protocol):
    """Writes chunks into engine memory (used by ``CacheEngine.retrieve``)."""

    def write_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        """Scatter each ``chunk.buffer`` into the engine's memory for its tokens."""
