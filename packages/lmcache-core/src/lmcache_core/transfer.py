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
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lmcache_core.errors import LayoutError

if TYPE_CHECKING:
    from lmcache_core.layout import KVLayout


@dataclass(frozen=True)
class ChunkIO:
    """One chunk to move: tokens ``[start, end)`` of the request and their buffer.

    When writing back, only tokens in ``[write_from, write_until)`` are
    written: tokens before ``write_from`` are already in the engine's memory
    (its own prefix cache hit), tokens from ``write_until`` on are not wanted
    (the engine recomputes them). Layouts that move whole blocks only widen
    the range to the blocks it touches. A writer touches only the blocks of
    the write range, so a chunk may reach past the request's blocks (the
    first tokens of a longer stored chunk, :mod:`lmcache_core.chunk_aliases`).
    """

    start: int
    end: int
    buffer: memoryview
    write_from: int = 0
    write_until: int | None = None

    @property
    def write_range(self) -> tuple[int, int]:
        """The tokens to write, clipped to the chunk: ``[lo, hi)``, possibly empty."""
        hi = self.end if self.write_until is None else min(self.end, self.write_until)
        lo = max(self.start, self.write_from)
        return lo, max(lo, hi)

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


class Completion(Protocol):
    """A copy started without waiting for it (a GPU kernel queued on a stream)."""

    def done(self) -> bool:
        """Has the copy finished? Never blocks."""

    def wait(self) -> None:
        """Block until it has; raises if it failed."""


class Finished:
    """The completion of a copy that finished before it was returned."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


@runtime_checkable
class AsyncKVReader(Protocol):
    """A reader that can start a copy and return before it finishes (GPU readers).

    Until the completion reports done the buffers must not be read, and the
    engine memory the copy reads must not be reused: the adapter keeps the
    engine from overwriting those blocks (on a GPU, by ordering its stream
    after the copy).
    """

    def start_read(self, chunks: Sequence[ChunkIO]) -> Completion: ...


@runtime_checkable
class AsyncKVWriter(Protocol):
    """A writer that can start a copy and return before it finishes (layer-wise loads).

    The chunk buffers stay valid (their slots held) until the completion
    reports done; the adapter orders the engine's reads of that KV after it.
    """

    def start_write(self, chunks: Sequence[ChunkIO]) -> Completion: ...


@runtime_checkable
class KVWriter(Protocol):
    """Writes chunks into engine memory (used by ``CacheEngine.retrieve``)."""

    def write_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        """Scatter each ``chunk.buffer`` into the engine's memory for its tokens."""


# Helpers every implementation shares, so they agree on what is valid.


def check_chunk(layout: KVLayout, chunk: ChunkIO) -> None:
    """Refuse, before any byte moves, a buffer of the wrong size or a chunk that splits an
    opaque block."""
    from lmcache_core.layout import LayoutKind

    expected = layout.chunk_bytes(chunk.num_tokens)
    if chunk.buffer.nbytes != expected:
        raise LayoutError(
            f"chunk buffer for tokens [{chunk.start}, {chunk.end}) has {chunk.buffer.nbytes} "
            f"bytes, the layout needs {expected}"
        )
    bs = layout.block_size
    if layout.kind is LayoutKind.VLLM_CPU and (chunk.start % bs or chunk.num_tokens % bs):
        raise LayoutError(
            "the vllm_cpu layout moves whole blocks only; chunk "
            f"[{chunk.start}, {chunk.end}) is not aligned to {bs} tokens"
        )


def block_range(block_size: int, start: int, end: int, table_len: int) -> tuple[int, int, int, int]:
    """Blocks ``[first, last)`` of a request's table that hold tokens ``[start, end)``, and
    the token offsets ``lo, hi`` of those tokens inside the first of them."""
    first, last = start // block_size, -(-end // block_size)
    if last > table_len:
        raise LayoutError(f"tokens up to {end} need {last} blocks, the block table has {table_len}")
    return first, last, start - first * block_size, end - first * block_size
