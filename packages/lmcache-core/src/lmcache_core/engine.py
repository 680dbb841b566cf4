"""``CacheEngine``: lookup, store and retrieve of token prefixes over a chunk store.

The engine keys prompts (chunks, namespace, salts) and moves KV between the
engine's memory and chunks; where chunks live is its
:class:`~lmcache_core.chunk_store.ChunkStore`: this process's pool and tiers
(:class:`~lmcache_core.chunk_store.LocalChunkStore`, the default) or an
``lmcache server`` on the host. It never touches engine memory itself.
Moving bytes is delegated to a :class:`~lmcache_core.transfer.KVReader`
(store) or :class:`~lmcache_core.transfer.KVWriter` (retrieve) that the engine
adapter supplies, so each chunk is copied exactly once on the way in (engine
memory -> pool slot) and once on the way out (pool slot -> engine memory).

A tier that fails is logged, counted and treated as a miss: the request goes
on and recomputes. Reader or writer failures likewise turn into "nothing
stored" or "nothing retrieved", never into an exception for the engine.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lmcache_core import staged_load, staged_store
from lmcache_core.arena import Arena
from lmcache_core.auth import load_secret
from lmcache_core.backends.base import BackendContext, StorageBackend
from lmcache_core.backends.cpu import LocalCPUBackend
from lmcache_core.chunk_aliases import ChunkAliases
from lmcache_core.chunk_store import ChunkStore, LocalChunkStore
from lmcache_core.config import CacheConfig
from lmcache_core.keys import (
    CacheKey,
    ChunkedPrompt,
    ChunkSpan,
    KeyNamespace,
    MultimodalItem,
    TokenChunker,
    keys_for,
)
from lmcache_core.layout import KVLayout
from lmcache_core.metrics import Metrics
from lmcache_core.pool import SlotPool, dram_arena
from lmcache_core.request_options import tenant_id
from lmcache_core.sizes import format_size
from lmcache_core.staged_load import StagedLoad
from lmcache_core.tier_cascade import TierCascade, Watcher
from lmcache_core.transfer import KVReader, KVWriter

logger = logging.getLogger(__name__)


class CacheEngine:
    """The KV cache of one engine worker (one tensor-parallel rank)."""

    def __init__(
        self,
        config: CacheConfig,
        *,
        model: str,
        layout: KVLayout,
        world_size: int = 1,
        rank: int = 0,
        arena: Arena | None = None,
        metrics: Metrics | None = None,
        tiers: Sequence[StorageBackend] | None = None,
        key_extra: Sequence[tuple[str, str]] = (),
        store: ChunkStore | None = None,
        store_factory: Callable[[KeyNamespace, Metrics], ChunkStore] | None = None,
    ) -> None:
        """``key_extra``: what else makes this engine's KV its own (the KV cache dtype,
        the weights' quantization), as (name, value) pairs in the key namespace.
        ``store``: where chunks live (an ``lmcache server``'s client), or
        ``store_factory(namespace, metrics)`` making it once the namespace is known; by
        default this process's pool (over ``arena``) and tiers (``tiers``, or built
        from ``config``)."""
        layout.check_chunk_size(config.chunk_size)
        self.config = config
        self.layout = layout
        self.namespace = KeyNamespace(
            model=model,
            layout=layout,
            chunk_size=config.chunk_size,
            world_size=world_size,
            rank=rank,
            hash_algorithm=config.hash_algorithm,
            extra=tuple(sorted((str(k), str(v)) for k, v in key_extra)),
        )
        self.chunker = TokenChunker(config.chunk_size, config.hash_algorithm)
        self.metrics = metrics if metrics is not None else Metrics()
        if store is None and store_factory is not None:
            store = store_factory(self.namespace, self.metrics)
        if store is None:
            slot_bytes = layout.chunk_bytes(config.chunk_size)
            if arena is None:
                arena = dram_arena(config, slot_bytes, layout.bytes_per_token)
            context = BackendContext(
                layout=layout,
                pool=SlotPool(arena, slot_bytes),
                metrics=self.metrics,
                secret=load_secret(config),
                namespace=self.namespace.digest,
            )
            store = LocalChunkStore(config, context, tiers)
        self.chunk_store: ChunkStore = store
        # Every family has its zero series from the start (per tier where labelled).
        self.metrics.declare(tier=list(store.tier_names))
        # A process that exits without close() still finishes queued lower-tier writes.
        atexit.register(_close_at_exit, weakref.ref(self))
        logger.info(
            "lmcache engine: %s per chunk, %d slots, tiers: %s",
            format_size(layout.chunk_bytes(config.chunk_size)),
            store.num_slots,
            ", ".join(store.tier_names) or "none",
        )

    # The in-process store's parts, for tests, tools and adapters that report them.

    @property
    def local(self) -> LocalChunkStore:
        """The in-process store (an engine on an ``lmcache server`` has none)."""
        if not isinstance(self.chunk_store, LocalChunkStore):
            raise AttributeError("this engine's chunks live in an lmcache server, not here")
        return self.chunk_store

    @property
    def cascade(self) -> TierCascade:
        return self.local.cascade

    @property
    def context(self) -> BackendContext:
        return self.local.context

    @property
    def pool(self) -> SlotPool:
        return self.local.context.pool

    @property
    def aliases(self) -> ChunkAliases:
        return self.local.aliases

    @property
    def tiers(self) -> list[StorageBackend]:
        return self.cascade.tiers if isinstance(self.chunk_store, LocalChunkStore) else []

    @property
    def cpu(self) -> LocalCPUBackend | None:
        return self.cascade.cpu if isinstance(self.chunk_store, LocalChunkStore) else None

    def watch(self, callback: Watcher) -> None:
        """See :meth:`TierCascade.watch`."""
        self.chunk_store.watch(callback)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued lower-tier write is done; False on timeout."""
        return self.chunk_store.flush(timeout)

    # ------------------------------------------------------------------ keys

    def chunk(
        self,
        tokens: Sequence[int] | Any,
        *,
        cache_salt: str | None = None,
        adapter: str | None = None,
        mm_items: Sequence[MultimodalItem] = (),
    ) -> ChunkedPrompt:
        """The chunks of a prompt that the cache stores or looks up.

        The trailing partial chunk is included when ``save_unfull_chunk`` is
        set; for layouts that move whole blocks only it is cut to whole blocks.
        A :class:`ChunkedPrompt` (hashed once, e.g. by a scheduler, with its
        adapter and multimodal items) is used as is: every other method takes
        one in place of ``tokens``.
        """
        if isinstance(tokens, ChunkedPrompt):
            if tokens.chunk_size != self.config.chunk_size:
                raise ValueError(
                    f"prompt was chunked by {tokens.chunk_size} tokens, the cache uses "
                    f"{self.config.chunk_size}"
                )
            return tokens
        return self.chunker.chunk(
            tokens,
            cache_salt=cache_salt,
            adapter=adapter,
            mm_items=mm_items,
            include_partial=self.config.save_unfull_chunk,
            partial_multiple=1 if self.layout.engine_neutral else self.layout.block_size,
        )

    def spans(
        self, tokens: Sequence[int] | Any, *, cache_salt: str | None = None
    ) -> list[ChunkSpan]:
        return self.chunk(tokens, cache_salt=cache_salt).spans()

    def keys(self, spans: Sequence[ChunkSpan]) -> list[CacheKey]:
        return keys_for(self.namespace, spans)

    # ------------------------------------------------------------------ lookup

    def lookup(
        self,
        tokens: Sequence[int] | Any,
        *,
        cache_salt: str | None = None,
        pin_owner: str | None = None,
    ) -> int:
        """Length of the longest cached prefix of ``tokens``, in tokens.

        With ``pin_owner``, the hit chunks held in the CPU tier are pinned for
        that owner (a request id) until ``retrieve``/``unpin`` with the same
        owner, or until ``pin_timeout`` passes. A later lookup by the same
        owner replaces its pins.
        """
        prompt = self.chunk(tokens, cache_salt=cache_salt)
        hits = self.lookup_chunks(prompt, pin_owner=pin_owner)
        return prompt.end(hits - 1) if hits else 0

    def lookup_chunks(self, prompt: ChunkedPrompt, *, pin_owner: str | None = None) -> int:
        """How many leading chunks of ``prompt`` are cached (pinning them for ``pin_owner``).

        The last chunk, if partial, may be found as the first blocks of a longer
        stored chunk (see :meth:`add_aliases`).
        """
        m = self.metrics
        with m.timer("lmcache:time_to_lookup"):
            hits = self.chunk_store.lookup(
                prompt.keys(self.namespace), owner=pin_owner, alias_last=True
            )
        m.inc("lmcache:num_lookup_requests")
        m.inc("lmcache:num_lookup_tokens", prompt.num_tokens)
        m.inc("lmcache:num_lookup_hits", prompt.end(hits - 1) if hits else 0)
        return hits

    def lookup_chains(
        self,
        chains: Sequence[Sequence[CacheKey]],
        *,
        pin_owner: str | None = None,
        aliases: bool = False,
    ) -> list[int]:
        """How many leading keys of each independent chain are cached (pinning them all).

        For prompts made of separately keyed parts (blend segments), or a prompt's
        head and the candidate keys of its next chunk: one call pins every
        chain's hits for ``pin_owner``, replacing its earlier pins. With
        ``aliases``, a chain's last key may be found through :meth:`add_aliases`.
        """
        hits = self.chunk_store.lookup_chains(chains, owner=pin_owner, aliases=aliases)
        self.metrics.inc("lmcache:num_lookup_requests")
        return hits

    def hit_sources(self, owner: str) -> list[str]:
        """Where each chunk ``owner``'s last lookup found is (:mod:`lmcache_core.hit_sources`)."""
        return self.chunk_store.hit_kinds(owner)

    def add_aliases(
        self, prompt: ChunkedPrompt, inner: Mapping[int, Sequence[bytes]], step: int
    ) -> None:
        """Let lookups and loads find the first blocks of ``prompt``'s chunks.

        ``inner[i]`` holds the digests of chunk ``i``'s first ``step``,
        ``2 * step``, ... tokens (:meth:`TokenChunker.inner_prefixes`, computed
        by whoever has the token ids). A later prompt that shares those
        blocks only, then goes on otherwise, loads them instead of recomputing
        them (:mod:`lmcache_core.chunk_aliases`).
        """
        ns = self.namespace.digest
        for i, digests in inner.items():
            if not 0 <= i < len(prompt) or not digests:
                continue
            target = CacheKey(ns + prompt.digests[i])
            pairs = [(CacheKey(ns + d), (k + 1) * step) for k, d in enumerate(digests)]
            self.chunk_store.add_aliases(target, prompt.end(i) - prompt.start(i), pairs)

    def unpin(self, owner: str) -> None:
        """Release ``owner``'s pins (a request that will not load what it looked up)."""
        self.chunk_store.unpin(owner)

    # ------------------------------------------------------------------ store

    def store(
        self,
        tokens: Sequence[int] | Any,
        reader: KVReader,
        *,
        cache_salt: str | None = None,
        tenant: str | None = None,
    ) -> int:
        """Store the KV of ``tokens`` (all computed by the engine); returns tokens newly stored.

        Chunks already cached are skipped. Storing stops at the first chunk
        for which no memory can be freed, since later chunks would be
        unreachable by a prefix lookup. ``tenant``: whose quota the chunks count
        against on a server (default: the ``cache_salt``'s).
        """
        self.metrics.inc("lmcache:num_store_requests")
        spans = self.spans(tokens, cache_salt=cache_salt)
        if not spans:
            return 0
        if tenant is None:
            tenant = tenant_id(cache_salt)
        return self._store_chunks(self.keys(spans), spans, reader, tenant)  # times itself

    def store_chunks(
        self,
        keys: Sequence[CacheKey],
        spans: Sequence[ChunkSpan],
        reader: KVReader,
        *,
        tenant: str = "",
    ) -> int:
        """Store chunks the caller named: ``keys[i]`` holds tokens ``spans[i]`` of ``reader``.

        For engines that hash their own pages (SGLang's page keys); ``store``
        is this with lmcache's own prefix keys. Returns tokens newly stored.
        """
        return self._store_chunks(keys, spans, reader, tenant)

    def _store_chunks(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], reader: KVReader, tenant: str
    ) -> int:
        staged = staged_store.stage(
            self.chunk_store, self.metrics, keys, spans, reader, asynchronous=False, tenant=tenant
        )
        return 0 if staged is None else self.finish_store(staged)

    def store_async(
        self,
        tokens: Sequence[int] | Any,
        reader: KVReader,
        *,
        cache_salt: str | None = None,
        from_chunk: int = 0,
        tenant: str | None = None,
    ) -> staged_store.StagedStore | None:
        """Start storing the KV of ``tokens``; the copy may still be in flight on return.

        With a reader that can start copies without waiting (a GPU reader),
        the engine's step is not held up by the device. The chunks reach the
        tiers only in :meth:`finish_store` (or through a
        :class:`~lmcache_core.staged_store.SaveQueue`); None when there is
        nothing to store. Chunks before ``from_chunk`` are not stored (the
        engine no longer holds their KV: a sliding window left them).
        """
        self.metrics.inc("lmcache:num_store_requests")
        spans = self.spans(tokens, cache_salt=cache_salt)[from_chunk:]
        if not spans:
            return None
        return staged_store.stage(
            self.chunk_store,
            self.metrics,
            self.keys(spans),
            spans,
            reader,
            asynchronous=True,
            tenant=tenant_id(cache_salt) if tenant is None else tenant,
        )

    def finish_store(self, staged: staged_store.StagedStore) -> int:
        """Wait for a started store's copy and commit it; returns tokens newly stored."""
        return staged_store.commit(self.chunk_store, self.metrics, staged)

    def discard_store(self, staged: staged_store.StagedStore) -> None:
        """Drop a started store: its copy is waited for, its chunks released, nothing stored."""
        staged_store.discard(self.chunk_store, staged)

    # ------------------------------------------------------------------ retrieve

    def retrieve(
        self,
        tokens: Sequence[int] | Any,
        writer: KVWriter,
        *,
        cache_salt: str | None = None,
        write_from: int = 0,
        max_tokens: int | None = None,
        pin_owner: str | None = None,
    ) -> int:
        """Write the longest cached prefix of ``tokens`` into engine memory.

        Only tokens in ``[write_from, max_tokens)`` are written: those before
        ``write_from`` are already in engine memory, those after ``max_tokens``
        are not wanted (a chunk that straddles ``max_tokens`` is read and
        written in part). Returns the end of the prefix now in engine memory
        from the cache (0 when nothing was loaded); everything after it must be
        computed. Pins of ``pin_owner`` are released.
        """
        end, staged = self._fetch_and_write(
            tokens, writer, cache_salt, write_from, max_tokens, pin_owner, asynchronous=False
        )
        if staged is not None:
            staged.release()
        return end

    def retrieve_async(
        self,
        tokens: Sequence[int] | Any,
        writer: KVWriter,
        *,
        cache_salt: str | None = None,
        write_from: int = 0,
        max_tokens: int | None = None,
        pin_owner: str | None = None,
    ) -> tuple[int, StagedLoad | None]:
        """``retrieve`` for writers that copy later (layer by layer): the chunks stay held.

        Returns the end of the prefix that will be in engine memory once the
        writer's completion is done, and the staged load (None when nothing
        is loaded), whose ``release`` frees the chunks once the copy is done.
        """
        return self._fetch_and_write(
            tokens, writer, cache_salt, write_from, max_tokens, pin_owner, asynchronous=True
        )

    def _fetch_and_write(
        self,
        tokens: Sequence[int] | Any,
        writer: KVWriter,
        cache_salt: str | None,
        write_from: int,
        max_tokens: int | None,
        pin_owner: str | None,
        *,
        asynchronous: bool,
    ) -> tuple[int, StagedLoad | None]:
        self.metrics.inc("lmcache:num_retrieve_requests")
        try:
            with self.metrics.timer("lmcache:time_to_retrieve"):
                spans = self.spans(tokens, cache_salt=cache_salt)
                if max_tokens is not None:
                    spans = [s for s in spans if s.start < max_tokens]
                return staged_load.fetch_and_write(
                    self.chunk_store,
                    self.metrics,
                    self.keys(spans),
                    spans,
                    writer,
                    write_from,
                    max_tokens,
                    asynchronous=asynchronous,
                )
        finally:
            if pin_owner is not None:
                self.unpin(pin_owner)

    def prefix_present(self, keys: Sequence[CacheKey]) -> int:
        """How many leading ``keys`` some tier holds (key-level ``lookup``)."""
        return self.chunk_store.prefix_present(keys)

    def present(self, keys: Sequence[CacheKey]) -> list[bool]:
        """Whether some tier holds each of ``keys`` (e.g. after ``store_chunks``)."""
        return self.chunk_store.present(keys)

    def retrieve_chunks(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], writer: KVWriter
    ) -> int:
        """Write the longest stored prefix of ``keys`` (tokens ``spans[i]``) through ``writer``.

        Key-level ``retrieve`` for engines that name their own pages. Returns
        how many leading chunks were written (0 on any failure: recompute).
        """
        self.metrics.inc("lmcache:num_retrieve_requests")
        self.metrics.inc("lmcache:num_requested_tokens", sum(s.num_tokens for s in spans))
        with self.metrics.timer("lmcache:time_to_retrieve"):
            return staged_load.write_chunk_prefix(
                self.chunk_store, self.metrics, keys, spans, writer
            )

    # ------------------------------------------------------------------ admin

    def remove(self, tokens: Sequence[int] | Any, *, cache_salt: str | None = None) -> int:
        """Remove the chunks of ``tokens`` from every tier; returns chunks removed."""
        return self.chunk_store.remove(self.keys(self.spans(tokens, cache_salt=cache_salt)))

    def close(self) -> None:
        """Write what lower tiers have queued (up to ``blocking_timeout_secs``), then close."""
        self.chunk_store.close(self.config.blocking_timeout_secs)

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_at_exit(ref: weakref.ref[CacheEngine]) -> None:
    engine = ref()
    # A server flushes its own tiers (it outlives this process); only ours need it here.
    if engine is not None and isinstance(engine.chunk_store, LocalChunkStore) and engine.tiers:
        try:
            engine.flush(engine.config.blocking_timeout_secs)
        except Exception:
            logger.warning("flushing lower tiers at exit failed", exc_info=True)
