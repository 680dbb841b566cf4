"""Where a :class:`~lmcache_core.engine.CacheEngine`'s chunks live: the seam between
the engine front (keys, copies to and from engine memory) and the store behind it.

Why a seam here: the same engine front runs over two stores.

* :class:`LocalChunkStore`, in the engine's own process: the memory pool, the
  :class:`~lmcache_core.tier_cascade.TierCascade` (DRAM, disk, remote tiers),
  pins and the alias map. This is the in-process mode.
* ``lmcache_core.mp.client.ServerChunkStore``: an ``lmcache server`` on the
  same host holds all of that for every engine there; chunks are slots of its
  shared-memory arena, mapped into the engine's process, so the engine's
  kernels copy KV straight into and out of them.

The contract is batched (one call per request step, never per chunk), so a
store on the other side of a socket costs a round trip per call, not per chunk.
Chunks handed out (:meth:`ChunkStore.fetch`, :meth:`ChunkStore.allocate`) are
owned by the caller: it releases each once its copy is done, or hands staged
ones back through :meth:`ChunkStore.commit` / :meth:`ChunkStore.abort`.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from lmcache_core import hit_sources
from lmcache_core.chunk_aliases import (
    ChunkAliases,
    get_through_alias,
    holders_with_alias,
    present_with_alias,
)
from lmcache_core.keys import CacheKey, ChunkSpan

if TYPE_CHECKING:
    from lmcache_core.backends.base import BackendContext, StorageBackend
    from lmcache_core.backends.cpu import LocalCPUBackend
    from lmcache_core.config import CacheConfig
    from lmcache_core.tier_cascade import TierCascade, Watcher

logger = logging.getLogger(__name__)


class StoredChunk(Protocol):
    """What the engine front needs of a chunk: its bytes and how to give it back.

    :class:`~lmcache_core.pool.Chunk` (a pool slot in this process) and the
    server client's chunks (a slot of the server's shared arena) both are one.
    """

    key: CacheKey
    num_tokens: int
    nbytes: int
    view: memoryview

    def release(self) -> None: ...


#: A store's staged chunk: the span of the prompt whose KV goes into it, and the chunk.
Staged = tuple[ChunkSpan, StoredChunk]


def release_all(chunks: Sequence[StoredChunk]) -> None:
    """Release ``chunks``; chunks that can go back in one message (a server's leases,
    ``release_many``) do, instead of one message each."""
    if not chunks:
        return
    many = getattr(type(chunks[0]), "release_many", None)
    if many is not None and all(type(c) is type(chunks[0]) for c in chunks):
        many(chunks)
        return
    for c in chunks:
        c.release()


class ChunkStore(ABC):
    """The chunks of one key namespace, their tiers, pins and aliases.

    Every method is safe to call from any thread. A failing tier is a miss,
    never an exception: only a store that cannot be reached at all (a server
    gone) may raise, and the engine front turns that into a miss too.
    """

    #: Names of the tiers, nearest first (for logs and status).
    tier_names: list[str]

    @property
    @abstractmethod
    def num_slots(self) -> int:
        """Chunks the DRAM tier can hold (0 when there is none)."""

    # ------------------------------------------------------------------ lookups

    @abstractmethod
    def lookup(self, keys: Sequence[CacheKey], *, owner: str | None, alias_last: bool) -> int:
        """How many leading ``keys`` are stored; with ``alias_last``, the last one may be
        found as the first blocks of a longer stored chunk (:meth:`add_aliases`).

        With ``owner``, the found chunks are pinned for it (replacing its earlier
        pins) until :meth:`unpin` or the pin timeout.
        """

    @abstractmethod
    def lookup_chains(
        self, chains: Sequence[Sequence[CacheKey]], *, owner: str | None, aliases: bool
    ) -> list[int]:
        """:meth:`lookup` of several independent chains at once, pinning all their hits."""

    @abstractmethod
    def prefix_present(self, keys: Sequence[CacheKey]) -> int:
        """How many leading ``keys`` some tier holds (no pins, no aliases)."""

    def present(self, keys: Sequence[CacheKey]) -> list[bool]:
        """Whether some tier holds each of ``keys`` (no pins, no aliases)."""
        hits = self.lookup_chains([[k] for k in keys], owner=None, aliases=False)
        return [h == 1 for h in hits]

    @abstractmethod
    def hit_kinds(self, owner: str) -> list[str]:
        """The kind of tier (:mod:`lmcache_core.hit_sources`) of each chunk ``owner``'s last
        lookup found."""

    @abstractmethod
    def unpin(self, owner: str) -> None:
        """Release ``owner``'s pins and forget its last lookup."""

    @abstractmethod
    def add_aliases(
        self, target: CacheKey, target_tokens: int, pairs: Sequence[tuple[CacheKey, int]]
    ) -> None:
        """Record that stored chunk ``target`` holds the KV of each ``(key, tokens)``."""

    # ------------------------------------------------------------------ loads

    @abstractmethod
    def fetch(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], *, alias_last: bool
    ) -> tuple[list[StoredChunk], list[ChunkSpan]]:
        """The chunks of the longest stored prefix of ``keys`` (tokens ``spans``), owned by
        the caller, and their spans.

        With ``alias_last``, a last key that misses may be found as the first
        blocks of a longer chunk: its span then is the longer chunk's (the
        caller writes the requested tokens only). A chunk whose size is not
        its span's is a miss (and is removed from the tier that gave it).
        """

    # ------------------------------------------------------------------ stores

    @abstractmethod
    def allocate(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], *, tenant: str = ""
    ) -> list[Staged]:
        """Fresh chunks for the keys the first tier lacks, in order, to be filled by the
        caller and then :meth:`commit` ted or :meth:`abort` ed. ``tenant``
        (:func:`~lmcache_core.request_options.tenant_id`) is whose quota they count
        against, where a store has quotas (an ``lmcache server``).

        Stops at the first key for which no memory can be freed: later chunks
        would be unreachable by a prefix lookup. No lookup sees these chunks
        until they are committed.
        """

    @abstractmethod
    def commit(self, staged: Sequence[Staged]) -> int:
        """Put filled chunks into every tier, then release them; tokens newly stored in the
        first tier (chunks another store committed meanwhile are not stored twice)."""

    def abort(self, staged: Sequence[Staged]) -> None:
        """Release staged chunks whose copy failed: nothing is stored."""
        release_all([chunk for _, chunk in staged])

    # ------------------------------------------------------------------ admin

    @abstractmethod
    def remove(self, keys: Sequence[CacheKey]) -> int:
        """Remove ``keys`` from every tier; chunks removed."""

    @abstractmethod
    def watch(self, callback: Watcher) -> None:
        """Call ``callback(event, tier, keys)`` as chunks enter or leave tiers."""

    @abstractmethod
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued lower-tier writes are done; False on timeout."""

    @abstractmethod
    def close(self, timeout: float) -> None:
        """Write what is queued (up to ``timeout`` seconds), then release everything."""


class LocalChunkStore(ChunkStore):
    """The in-process store: a :class:`TierCascade` over this process's memory pool.

    Also what an ``lmcache server`` runs for each namespace its clients use,
    with a DRAM tier shared by all of them (``cpu=``).
    """

    def __init__(
        self,
        config: CacheConfig,
        context: BackendContext,
        tiers: Sequence[StorageBackend] | None = None,
        *,
        cpu: LocalCPUBackend | None = None,
    ) -> None:
        """``cpu``: a DRAM tier (and its pool) shared with other stores, which its owner
        closes; otherwise this store owns the pool in ``context`` and closes it."""
        from lmcache_core.tier_cascade import TierCascade

        self._owns_pool = cpu is None
        self.config = config
        self.context = context
        self.metrics = context.metrics
        self.cascade: TierCascade = TierCascade(config, context, tiers, cpu=cpu)
        #: Partial-chunk keys that stored chunks' first blocks answer (:meth:`add_aliases`).
        self.aliases = ChunkAliases(config.max_chunk_aliases)
        #: Each lookup owner's found chunks, for :meth:`hit_kinds`.
        self.held = hit_sources.HeldByOwner()
        self._held_lock = threading.Lock()

    @property
    def tier_names(self) -> list[str]:  # type: ignore[override]
        return [t.name for t in self.cascade.tiers]

    @property
    def num_slots(self) -> int:
        return self.context.pool.num_slots

    # ------------------------------------------------------------------ lookups

    def lookup(self, keys: Sequence[CacheKey], *, owner: str | None, alias_last: bool) -> int:
        if alias_last:
            hits, held = present_with_alias(self.cascade, self.aliases, keys)
        else:
            hits = self.cascade.prefix_present(list(keys))
            held = list(keys[:hits])
        self._pin(held, owner)
        return hits

    def lookup_chains(
        self, chains: Sequence[Sequence[CacheKey]], *, owner: str | None, aliases: bool
    ) -> list[int]:
        # One-key chains (candidate keys of one chunk) are checked together.
        singles = [i for i, c in enumerate(chains) if aliases and len(c) == 1]
        holder = dict(
            zip(
                singles,
                holders_with_alias(self.cascade, self.aliases, [chains[i][0] for i in singles]),
            )
        )
        hits: list[int] = []
        held: list[CacheKey] = []
        for i, chain in enumerate(chains):
            if i in holder:
                keys = [k for k in (holder[i],) if k is not None]
                h = len(keys)
            elif aliases:
                h, keys = present_with_alias(self.cascade, self.aliases, chain)
            else:
                h = self.cascade.prefix_present(list(chain))
                keys = list(chain[:h])
            hits.append(h)
            held.extend(keys)
        self._pin(held, owner)
        return hits

    def _pin(self, keys: list[CacheKey], owner: str | None) -> None:
        """Pin ``keys`` in the DRAM tier for ``owner``, replacing its earlier pins."""
        if owner is None:
            return
        with self._held_lock:
            self.held.record(owner, keys)
        cpu = self.cascade.cpu
        if cpu is not None:
            cpu.unpin(owner)
            if keys:
                cpu.pin(keys, owner, self.config.pin_timeout)

    def prefix_present(self, keys: Sequence[CacheKey]) -> int:
        return self.cascade.prefix_present(list(keys))

    def present(self, keys: Sequence[CacheKey]) -> list[bool]:
        return self.cascade.present(list(keys))

    def hit_kinds(self, owner: str) -> list[str]:
        with self._held_lock:
            keys = self.held.get(owner)
        return hit_sources.classify(self.cascade, keys)

    def unpin(self, owner: str) -> None:
        with self._held_lock:
            self.held.forget(owner)
        cpu = self.cascade.cpu
        if cpu is not None:
            cpu.unpin(owner)

    def add_aliases(
        self, target: CacheKey, target_tokens: int, pairs: Sequence[tuple[CacheKey, int]]
    ) -> None:
        self.aliases.add(target, target_tokens, pairs)

    # ------------------------------------------------------------------ loads

    def fetch(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], *, alias_last: bool
    ) -> tuple[list[StoredChunk], list[ChunkSpan]]:
        chunks: list[StoredChunk] = list(self.cascade.get_prefix(list(keys), spans))
        got = list(spans[: len(chunks)])
        if alias_last and keys and len(chunks) == len(keys) - 1:
            found = get_through_alias(self.cascade, self.aliases, keys[-1], spans[-1])
            if found is not None:
                chunks.append(found[0])
                got.append(found[1])
        return chunks, got

    # ------------------------------------------------------------------ stores

    def allocate(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], *, tenant: str = ""
    ) -> list[Staged]:
        tiers = self.cascade.tiers
        if not tiers:
            return []
        first = tiers[0]
        try:
            present = first.contains(list(keys))
        except Exception:
            self.cascade.tier_failed(first, "contains")
            present = [False] * len(keys)
        layout = self.context.layout
        todo: list[Staged] = []
        for span, key, ok in zip(spans, keys, present, strict=True):
            if ok:
                continue
            nbytes = layout.chunk_bytes(span.num_tokens) if layout is not None else 0
            chunk = self.cascade.allocate(key, span.num_tokens, nbytes)
            if chunk is None:
                break  # later chunks would be unreachable by a prefix lookup
            todo.append((span, chunk))
        return todo

    def commit(self, staged: Sequence[Staged]) -> int:
        try:
            tiers = self.cascade.tiers
            if not tiers or not staged:
                return 0
            first = tiers[0]
            chunks = [c for _, c in staged]
            # A store of the same chunks may have been committed while this one's copy
            # ran (two requests with one prefix, a step apart): not stored twice.
            try:
                present = first.contains([c.key for c in chunks])
            except Exception:
                present = [False] * len(chunks)
            todo = [(s, c) for (s, c), p in zip(staged, present) if not p]
            chunks = [c for _, c in todo]
            if not chunks:
                return 0
            stored = 0
            for tier in tiers:
                try:
                    ok = tier.put(chunks)  # type: ignore[arg-type]
                except Exception:
                    self.cascade.tier_failed(tier, "put")
                    continue
                if tier is first:
                    stored = sum(s.num_tokens for (s, _), good in zip(todo, ok) if good)
                self.cascade.stored(tier, chunks, ok)  # type: ignore[arg-type]
            return stored
        finally:
            self.abort(staged)  # the tiers hold their own references now

    # ------------------------------------------------------------------ admin

    def remove(self, keys: Sequence[CacheKey]) -> int:
        return self.cascade.remove(list(keys))

    def watch(self, callback: Watcher) -> None:
        self.cascade.watch(callback)

    def flush(self, timeout: float | None = None) -> bool:
        return self.cascade.flush(timeout)

    def close(self, timeout: float) -> None:
        self.cascade.close(timeout)
        if self._owns_pool:
            self.context.pool.close()
