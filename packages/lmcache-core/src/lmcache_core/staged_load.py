"""Loads in two steps: the chunks fetched from the tiers and handed to a writer that
may copy them later (layer by layer, on a GPU stream), then released.

``CacheEngine.retrieve`` is both steps at once; ``CacheEngine.retrieve_async``
returns a :class:`StagedLoad` that holds the chunks' slots until the copy is
done, so a layer-wise adapter can scatter layer ``i`` just before the
engine's attention of layer ``i`` needs it.

``write_chunk_prefix`` is the key-level load (``CacheEngine.retrieve_chunks``)
for engines that name their own pages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lmcache_core.chunk_store import release_all
from lmcache_core.transfer import AsyncKVWriter, ChunkIO, Completion, Finished, KVWriter

if TYPE_CHECKING:
    from lmcache_core.chunk_store import ChunkStore, StoredChunk
    from lmcache_core.keys import CacheKey, ChunkSpan
    from lmcache_core.metrics import Metrics

logger = logging.getLogger(__name__)


class StagedLoad:
    """Chunks a load is (perhaps still) copying into the engine: held until released.

    ``release`` waits for the copy first (a no-op once done): a slot freed
    while a copy still reads it could be refilled under it.
    """

    def __init__(self, chunks: Sequence[StoredChunk], completion: Completion) -> None:
        self.chunks = chunks
        self.completion = completion
        self._released = False

    def done(self) -> bool:
        return self.completion.done()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self.completion.wait()
        except Exception:
            logger.exception("a copy into the engine failed after it started")
        finally:
            release_all(self.chunks)


def fetch_and_write(
    store: ChunkStore,
    metrics: Metrics,
    keys: Sequence[CacheKey],
    spans: Sequence[ChunkSpan],
    writer: KVWriter,
    write_from: int,
    max_tokens: int | None,
    *,
    asynchronous: bool,
) -> tuple[int, StagedLoad | None]:
    """Fetch the longest stored prefix of ``keys`` (tokens ``spans``) and hand it to
    ``writer`` (started only, with ``asynchronous`` and a writer that can); the end
    of the prefix now (or soon) in engine memory, and the chunks held until the
    copy is done (None when nothing is loaded).

    Only tokens in ``[write_from, max_tokens)`` are written. The last chunk, if
    partial, may be found as the first blocks of a longer stored chunk; only
    its own tokens are written then.
    """
    chunks: list[StoredChunk] = []
    handed_over = False
    try:
        if not spans:
            return 0, None
        wanted = (max_tokens if max_tokens is not None else spans[-1].end) - write_from
        metrics.inc("lmcache:num_requested_tokens", max(0, wanted))
        chunks, got = store.fetch(keys, spans, alias_last=True)
        if not chunks:
            return 0, None
        if len(chunks) == len(spans) and got[-1].end > spans[-1].end:
            # a longer chunk's first blocks: written up to the partial chunk's end only
            until = spans[-1].end
            max_tokens = until if max_tokens is None else min(max_tokens, until)
            metrics.inc("lmcache:num_partial_chunk_loads")
        ios = [ChunkIO(s.start, s.end, c.view, write_from, max_tokens) for s, c in zip(got, chunks)]
        ios = [io for io in ios if io.write_range[0] < io.write_range[1]]
        completion: Completion = Finished()
        try:
            if ios and asynchronous and isinstance(writer, AsyncKVWriter):
                completion = writer.start_write(ios)
            elif ios:
                writer.write_chunks(ios)
        except Exception:
            logger.exception("writing KV into the engine failed; it will recompute")
            metrics.inc("lmcache:num_failures", op="write_kv")
            return 0, None
        end = got[len(chunks) - 1].end
        if max_tokens is not None:
            end = min(end, max_tokens)
        metrics.inc("lmcache:num_hit_tokens", max(0, end - write_from))
        handed_over = True
        return end, StagedLoad(chunks, completion)
    finally:
        if not handed_over:
            release_all(chunks)


def write_chunk_prefix(
    store: ChunkStore,
    metrics: Metrics,
    keys: Sequence[CacheKey],
    spans: Sequence[ChunkSpan],
    writer: KVWriter,
) -> int:
    """Write the longest stored prefix of ``keys`` through ``writer``, synchronously.

    Returns how many leading chunks were written (0 on any failure: recompute).
    """
    chunks, got = store.fetch(keys, spans, alias_last=False)
    try:
        if not chunks:
            return 0
        ios = [ChunkIO(s.start, s.end, c.view) for s, c in zip(got, chunks)]
        try:
            writer.write_chunks(ios)
        except Exception:
            logger.exception("writing KV into the engine failed; it will recompute")
            metrics.inc("lmcache:num_failures", op="write_kv")
            return 0
        metrics.inc("lmcache:num_hit_tokens", sum(s.num_tokens for s in got))
        return len(chunks)
    finally:
        release_all(chunks)
