"""Stores in two steps: *stage* (slots allocated, the engine's KV copied in, perhaps
still in flight), then *commit* (the chunks handed to the tiers).

Why: on a GPU the copy out of the engine's KV is a kernel. Waiting for it in
the engine's step (as a synchronous store must) stalls the host while the
device drains its queue, and the engine loses its CPU/GPU overlap. A reader
that can start a copy without waiting (:class:`~lmcache_core.transfer.AsyncKVReader`)
returns a :class:`~lmcache_core.transfer.Completion`; the chunks stay out of
every tier (no lookup can find half-written bytes) until it is done, and the
adapter commits them later (:class:`SaveQueue`). Readers that copy
synchronously (the CPU kernels) get the same path with a completion that is
already done.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmcache_core.transfer import AsyncKVReader, ChunkIO, Completion, Finished, KVReader

if TYPE_CHECKING:
    from lmcache_core.chunk_store import ChunkStore, Staged
    from lmcache_core.engine import CacheEngine
    from lmcache_core.keys import CacheKey, ChunkSpan
    from lmcache_core.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class StagedStore:
    """Chunks allocated for a store whose KV is (being) copied in."""

    todo: list[Staged]
    completion: Completion
    #: Host time spent so far (the store's ``time_to_store`` counts host time only).
    host_seconds: float = 0.0
    committed: bool = field(default=False, init=False)

    def done(self) -> bool:
        return self.completion.done()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s, _ in self.todo)


def stage(
    store: ChunkStore,
    metrics: Metrics,
    keys: Sequence[CacheKey],
    spans: Sequence[ChunkSpan],
    reader: KVReader,
    *,
    asynchronous: bool,
    tenant: str = "",
) -> StagedStore | None:
    """Allocate chunks for the keys the first tier lacks and start copying the KV in.

    Returns None when there is nothing to store (all present, no memory, no
    tier, or the copy failed to start: logged and counted, chunks freed).
    """
    t0 = time.perf_counter()
    todo = store.allocate(keys, spans, tenant=tenant)
    if not todo:
        return None
    ios = [ChunkIO(s.start, s.end, c.view) for s, c in todo]
    try:
        if asynchronous and isinstance(reader, AsyncKVReader):
            completion = reader.start_read(ios)
        else:
            reader.read_chunks(ios)
            completion = Finished()
    except Exception:
        logger.exception("reading KV from the engine failed; nothing stored")
        metrics.inc("lmcache:num_failures", op="read_kv")
        store.abort(todo)
        return None
    return StagedStore(todo, completion, time.perf_counter() - t0)


def discard(store: ChunkStore, staged: StagedStore) -> None:
    """Drop a staged store: wait for its copy (its chunks are written to until then),
    then release its chunks; nothing is stored. For a store whose source turned out
    wrong after it was staged (a load into the same blocks that failed)."""
    if staged.committed:
        return
    staged.committed = True
    try:
        staged.completion.wait()
    except Exception:
        pass  # a failed copy: released all the same
    store.abort(staged.todo)


def commit(store: ChunkStore, metrics: Metrics, staged: StagedStore) -> int:
    """Wait for the copy (a no-op once done), hand the chunks to the store's tiers.

    Returns tokens newly stored in the first tier; 0 when the copy failed.
    """
    if staged.committed:
        return 0
    staged.committed = True
    t0 = time.perf_counter()
    try:
        try:
            staged.completion.wait()
        except Exception:
            logger.exception("copying KV out of the engine failed; nothing stored")
            metrics.inc("lmcache:num_failures", op="read_kv")
            store.abort(staged.todo)
            return 0
        stored = store.commit(staged.todo)
        metrics.inc("lmcache:num_stored_tokens", stored)
        return stored
    finally:
        elapsed = staged.host_seconds + time.perf_counter() - t0
        metrics.observe("lmcache:time_to_store", elapsed)


class SaveQueue:
    """Stores staged by an engine step and committed when their copies are done.

    An adapter adds each step's stores and polls every step (vLLM's
    ``get_finished``); a store is committed once its completion reports done,
    oldest first. ``max_in_flight`` bounds the slots held by copies not yet
    committed: past it, ``add`` waits for the oldest. ``drain`` waits for all
    (shutdown).
    """

    def __init__(
        self,
        engine: CacheEngine,
        *,
        max_in_flight: int = 64,
        on_commit: Callable[[str, StagedStore, int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_in_flight = max(1, max_in_flight)
        self.on_commit = on_commit
        self._queue: deque[tuple[str, StagedStore]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def owners(self) -> set[str]:
        """Owners with a store not yet committed."""
        return {owner for owner, _ in self._queue}

    def add(self, owner: str, staged: StagedStore) -> None:
        self._queue.append((owner, staged))
        while len(self._queue) > self.max_in_flight:
            self._commit_oldest()

    def poll(self) -> int:
        """Commit every store at the head of the queue whose copy is done; tokens stored."""
        stored = 0
        while self._queue and self._queue[0][1].done():
            stored += self._commit_oldest()
        return stored

    def discard(self, staged: Sequence[StagedStore]) -> None:
        """Drop these stores (not committed: their chunks are released, nothing stored)."""
        drop = {id(s) for s in staged}
        kept: deque[tuple[str, StagedStore]] = deque()
        for owner, s in self._queue:
            if id(s) in drop:
                self.engine.discard_store(s)
            else:
                kept.append((owner, s))
        self._queue = kept

    def drain(self) -> int:
        stored = 0
        while self._queue:
            stored += self._commit_oldest()
        return stored

    def _commit_oldest(self) -> int:
        owner, staged = self._queue.popleft()
        stored = self.engine.finish_store(staged)
        if self.on_commit is not None:
            try:
                self.on_commit(owner, staged, stored)
            except Exception:
                logger.exception("a save-commit callback failed")
        return stored
