"""``CacheEngine``: lookup, store and retrieve of token prefixes over a cascade of tiers.

The engine owns the memory pool and the tiers; it never touches engine
memory itself. Moving bytes is delegated to a :class:`~lmcache_core.transfer.KVReader`
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
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

from lmcache_core.arena import AnonymousArena, Arena
from lmcache_core.auth import load_secret
from lmcache_core.backends.base import BackendContext, StorageBackend
from lmcache_core.backends.cpu import LocalCPUBackend
from lmcache_core.config import CacheConfig
from lmcache_core.errors import ConfigError
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
from lmcache_core.plugins import BACKENDS, load_plugin
from lmcache_core.pool import SLOT_OFFSET, Chunk, SlotPool
from lmcache_core.sizes import format_size
from lmcache_core.tier import ManagedTier
from lmcache_core.transfer import ChunkIO, KVReader, KVWriter

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
    ) -> None:
        """``key_extra``: what else makes this engine's KV its own (the KV cache dtype,
        the weights' quantization), as (name, value) pairs in the key namespace."""
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
        slot_bytes = layout.chunk_bytes(config.chunk_size)
        if arena is None:
            capacity = config.max_local_cpu_size
            if capacity < slot_bytes:
                raise ConfigError(
                    [
                        f"max_local_cpu_size={format_size(capacity)} cannot hold one chunk of "
                        f"{format_size(slot_bytes)} ({config.chunk_size} tokens x "
                        f"{layout.bytes_per_token} bytes); raise it to at least "
                        f"{format_size(slot_bytes)} or lower chunk_size"
                    ]
                )
            try:
                arena = AnonymousArena(capacity + SLOT_OFFSET)
            except OSError as e:
                raise ConfigError(
                    [
                        f"max_local_cpu_size={format_size(capacity)} cannot be reserved "
                        f"({e.strerror}); lower it (a bare number is GB: write 512MiB, 5GiB)"
                    ]
                ) from None
        self.pool = SlotPool(arena, slot_bytes)
        self.context = BackendContext(
            layout=layout,
            pool=self.pool,
            metrics=self.metrics,
            secret=load_secret(config),
            namespace=self.namespace.digest,
        )
        self.cpu: LocalCPUBackend | None = None
        self._demote_to: StorageBackend | None = None
        self._evict_listeners: list[Any] = []
        #: ``watch`` callbacks: ``(event, tier name, keys)``, event "stored" or "removed".
        self._watchers: list[Callable[[str, str, list[CacheKey]], None]] = []
        if tiers is not None:
            self.tiers = list(tiers)
            for t in self.tiers:
                if isinstance(t, LocalCPUBackend):
                    self.cpu = t
        else:
            self.tiers = self._build_tiers(config)
        self._allocate = self.cpu.allocate if self.cpu is not None else self.pool.allocate
        # A process that exits without close() still finishes queued lower-tier writes.
        atexit.register(_close_at_exit, weakref.ref(self))
        logger.info(
            "lmcache engine: %s per chunk, %d slots, tiers: %s",
            format_size(self.pool.slot_bytes),
            self.pool.num_slots,
            ", ".join(t.name for t in self.tiers) or "none",
        )

    def _build_tiers(self, config: CacheConfig) -> list[StorageBackend]:
        """CPU (synchronous, zero-copy), then disk and remote behind write-behind and health."""
        tiers: list[StorageBackend] = []
        if config.local_cpu:
            cpu = load_plugin(BACKENDS, "cpu").from_config(config, self.context)
            self.cpu = cpu
            tiers.append(cpu)
        lower: list[StorageBackend] = []
        if config.local_disk:
            lower.append(load_plugin(BACKENDS, "disk").from_config(config, self.context))
        if config.enable_p2p:  # another instance's DRAM beats a remote store
            lower.append(load_plugin(BACKENDS, "p2p").from_config(config, self.context))
        if config.remote_url:
            scheme = urlparse(config.remote_url).scheme.lower()
            lower.append(load_plugin(BACKENDS, scheme).from_config(config, self.context))
        for backend in lower:
            tiers.append(
                ManagedTier(
                    backend,
                    metrics=self.metrics,
                    write_behind_bytes=config.write_behind_bytes if backend.write_behind else None,
                    base_backoff_s=config.tier_retry_backoff,
                    max_backoff_s=config.tier_retry_max_backoff,
                    timeout_s=config.blocking_timeout_secs,
                )
            )
        if self.cpu is not None and config.demote_on_evict:
            local = [t for t in tiers[1:] if not t.capabilities.shared]
            if local:
                self._demote_to = local[0]
        self._evict_listeners = [
            t.backend
            for t in tiers
            if isinstance(t, ManagedTier) and hasattr(t.backend, "evicted_upstream")
        ]
        if self.cpu is not None and (self._demote_to is not None or self._evict_listeners):
            self.cpu.on_evict = self._on_cpu_evict
        return tiers

    def watch(self, callback: Callable[[str, str, list[CacheKey]], None]) -> None:
        """Call ``callback(event, tier, keys)`` as chunks enter ("stored") or leave ("removed").

        For KV cache events a router consumes. Reported: stores (a lower tier's
        when its write is accepted), promotions into the CPU tier, CPU and
        local disk evictions, ``remove``. Not reported: what a shared tier
        drops on its own (TTL, another instance's eviction). The callback may
        run on a tier's writer thread; it must be quick and must not raise.
        """
        self._watchers.append(callback)
        if self.cpu is not None and self.cpu.on_evict is None:
            self.cpu.on_evict = self._on_cpu_evict
        for tier in self.tiers:
            backend = tier.backend if isinstance(tier, ManagedTier) else tier
            if hasattr(backend, "on_evict") and backend is not self.cpu:
                backend.on_evict = lambda key, name=tier.name: self._notify("removed", name, [key])

    def _notify(self, event: str, tier: str, keys: list[CacheKey]) -> None:
        for callback in self._watchers:
            try:
                callback(event, tier, keys)
            except Exception:
                logger.warning("a cache watcher failed on %s %s", event, tier, exc_info=True)

    def _on_cpu_evict(self, chunk: Chunk, may_demote: bool) -> None:
        if self._watchers:
            self._notify("removed", self.cpu.name if self.cpu else "cpu", [chunk.key])
        for listener in self._evict_listeners:  # e.g. the p2p tier unpublishes it
            listener.evicted_upstream(chunk.key)
        if may_demote and self._demote_to is not None:
            self._demote(chunk)

    def _demote(self, chunk: Chunk) -> None:
        """Called by the CPU tier as it evicts ``chunk``: keep it on local disk if it is not there.

        Most chunks are there already (stores are written through, behind);
        this catches the ones whose write was dropped, and chunks that came
        from a remote tier.
        """
        tier = self._demote_to
        if tier is None or (isinstance(tier, ManagedTier) and not tier.write_health.healthy):
            return
        if tier.contains([chunk.key])[0]:
            return
        if tier.put([chunk])[0]:
            self.metrics.inc("lmcache:num_demotions", tier=tier.name)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued lower-tier write is done; False on timeout."""
        ok = True
        for tier in self.tiers:
            if isinstance(tier, ManagedTier):
                ok = tier.flush(timeout) and ok
        return ok

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
        """How many leading chunks of ``prompt`` are cached (pinning them for ``pin_owner``)."""
        m = self.metrics
        with m.timer("lmcache:time_to_lookup"):
            keys = prompt.keys(self.namespace)
            hits = self._prefix_present(keys)
            if pin_owner is not None and self.cpu is not None:
                self.cpu.unpin(pin_owner)
                if hits:
                    self.cpu.pin(keys[:hits], pin_owner, self.config.pin_timeout)
        m.inc("lmcache:num_lookup_requests")
        m.inc("lmcache:num_lookup_tokens", prompt.num_tokens)
        m.inc("lmcache:num_lookup_hits", prompt.end(hits - 1) if hits else 0)
        return hits

    def lookup_chains(
        self, chains: Sequence[Sequence[CacheKey]], *, pin_owner: str | None = None
    ) -> list[int]:
        """How many leading keys of each independent chain are cached (pinning them all).

        For prompts made of separately keyed parts (blend segments): one call
        pins every part's hits for ``pin_owner``, replacing its earlier pins.
        """
        hits = [self._prefix_present(list(c)) if c else 0 for c in chains]
        if pin_owner is not None and self.cpu is not None:
            self.cpu.unpin(pin_owner)
            held = [k for c, h in zip(chains, hits) for k in c[:h]]
            if held:
                self.cpu.pin(held, pin_owner, self.config.pin_timeout)
        self.metrics.inc("lmcache:num_lookup_requests")
        return hits

    def _prefix_present(self, keys: list[CacheKey]) -> int:
        n = len(keys)
        if self.tiers and self.tiers[0] is self.cpu:
            # Fast path: walk the DRAM index until the first miss.
            first = self.cpu.prefix_length(keys)
            if first == n or len(self.tiers) == 1:
                return first
        present = [False] * n
        m = 0
        for tier in self.tiers:
            if m >= n:
                break
            idx = [i for i in range(m, n) if not present[i]]
            try:
                found = tier.contains([keys[i] for i in idx])
            except Exception:
                self._tier_failed(tier, "contains")
                continue
            for i, ok in zip(idx, found):
                if ok:
                    present[i] = True
            while m < n and present[m]:
                m += 1
        return m

    def unpin(self, owner: str) -> None:
        if self.cpu is not None:
            self.cpu.unpin(owner)

    # ------------------------------------------------------------------ store

    def store(
        self,
        tokens: Sequence[int] | Any,
        reader: KVReader,
        *,
        cache_salt: str | None = None,
    ) -> int:
        """Store the KV of ``tokens`` (all computed by the engine); returns tokens newly stored.

        Chunks already cached are skipped. Storing stops at the first chunk
        for which no memory can be freed, since later chunks would be
        unreachable by a prefix lookup.
        """
        self.metrics.inc("lmcache:num_store_requests")
        with self.metrics.timer("lmcache:time_to_store"):
            spans = self.spans(tokens, cache_salt=cache_salt)
            if not spans:
                return 0
            return self._store_chunks(self.keys(spans), spans, reader)

    def store_chunks(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], reader: KVReader
    ) -> int:
        """Store chunks the caller named: ``keys[i]`` holds tokens ``spans[i]`` of ``reader``.

        For engines that hash their own pages (SGLang's page keys); ``store``
        is this with lmcache's own prefix keys. Returns tokens newly stored.
        """
        with self.metrics.timer("lmcache:time_to_store"):
            return self._store_chunks(keys, spans, reader)

    def _store_chunks(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], reader: KVReader
    ) -> int:
        first_tier = self.tiers[0] if self.tiers else None
        if first_tier is None:
            return 0
        try:
            present = first_tier.contains(keys)
        except Exception:
            self._tier_failed(first_tier, "contains")
            present = [False] * len(keys)
        todo: list[tuple[ChunkSpan, Chunk]] = []
        for span, key, ok in zip(spans, keys, present, strict=True):
            if ok:
                continue
            chunk = self._allocate(key, span.num_tokens, self.layout.chunk_bytes(span.num_tokens))
            if chunk is None:
                break
            todo.append((span, chunk))
        if not todo:
            return 0
        chunks = [c for _, c in todo]
        try:
            try:
                reader.read_chunks([ChunkIO(s.start, s.end, c.view) for s, c in todo])
            except Exception:
                logger.exception("reading KV from the engine failed; nothing stored")
                self.metrics.inc("lmcache:num_failures", op="read_kv")
                return 0
            stored = 0
            for tier in self.tiers:
                try:
                    ok = tier.put(chunks)
                except Exception:
                    self._tier_failed(tier, "put")
                    continue
                if tier is first_tier:
                    stored = sum(s.num_tokens for (s, _), good in zip(todo, ok) if good)
                if self._watchers:
                    done = [c.key for c, good in zip(chunks, ok) if good]
                    if done:
                        self._notify("stored", tier.name, done)
            self.metrics.inc("lmcache:num_stored_tokens", stored)
            return stored
        finally:
            for c in chunks:
                c.release()

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
        self.metrics.inc("lmcache:num_retrieve_requests")
        with self.metrics.timer("lmcache:time_to_retrieve"):
            return self._retrieve(tokens, writer, cache_salt, write_from, max_tokens, pin_owner)

    def _retrieve(
        self,
        tokens: Sequence[int] | Any,
        writer: KVWriter,
        cache_salt: str | None,
        write_from: int,
        max_tokens: int | None,
        pin_owner: str | None,
    ) -> int:
        chunks: list[Chunk] = []
        try:
            spans = self.spans(tokens, cache_salt=cache_salt)
            if max_tokens is not None:
                spans = [s for s in spans if s.start < max_tokens]
            if not spans:
                return 0
            wanted = (max_tokens if max_tokens is not None else spans[-1].end) - write_from
            self.metrics.inc("lmcache:num_requested_tokens", max(0, wanted))
            chunks = self._get_prefix(self.keys(spans), spans)
            if not chunks:
                return 0
            ios = [
                ChunkIO(s.start, s.end, c.view, write_from, max_tokens)
                for s, c in zip(spans, chunks)
            ]
            ios = [io for io in ios if io.write_range[0] < io.write_range[1]]
            try:
                if ios:
                    writer.write_chunks(ios)
            except Exception:
                logger.exception("writing KV into the engine failed; it will recompute")
                self.metrics.inc("lmcache:num_failures", op="write_kv")
                return 0
            end = spans[len(chunks) - 1].end
            if max_tokens is not None:
                end = min(end, max_tokens)
            self.metrics.inc("lmcache:num_hit_tokens", max(0, end - write_from))
            return end
        finally:
            for c in chunks:
                c.release()
            if pin_owner is not None:
                self.unpin(pin_owner)

    def prefix_present(self, keys: Sequence[CacheKey]) -> int:
        """How many leading ``keys`` some tier holds (key-level ``lookup``)."""
        return self._prefix_present(list(keys))

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
            return self._retrieve_chunks(list(keys), spans, writer)

    def _retrieve_chunks(
        self, keys: list[CacheKey], spans: Sequence[ChunkSpan], writer: KVWriter
    ) -> int:
        chunks = self._get_prefix(keys, spans)
        try:
            if not chunks:
                return 0
            ios = [ChunkIO(s.start, s.end, c.view) for s, c in zip(spans, chunks)]
            try:
                writer.write_chunks(ios)
            except Exception:
                logger.exception("writing KV into the engine failed; it will recompute")
                self.metrics.inc("lmcache:num_failures", op="write_kv")
                return 0
            self.metrics.inc(
                "lmcache:num_hit_tokens", sum(s.num_tokens for s in spans[: len(chunks)])
            )
            return len(chunks)
        finally:
            for c in chunks:
                c.release()

    def _get_prefix(
        self, keys: list[CacheKey], spans: Sequence[ChunkSpan] | None = None
    ) -> list[Chunk]:
        """Chunks of the longest prefix of ``keys`` found in any tier (owned by the caller).

        With ``spans``, a chunk that does not hold exactly its span's tokens (a
        short frame with a valid checksum, a peer's entry with another size) is
        a miss: it is removed from the tier that gave it, so a fresh store can
        replace it, and never promoted.
        """
        n = len(keys)
        found: list[Chunk | None] = [None] * n
        m = 0
        for tier in self.tiers:
            if m >= n:
                break
            idx = [i for i in range(m, n) if found[i] is None]
            try:
                got = tier.get([keys[i] for i in idx], self._allocate)
            except Exception:
                self._tier_failed(tier, "get")
                continue
            promote = []
            misfits: list[CacheKey] = []
            for i, c in zip(idx, got):
                if c is not None and spans is not None and not self._fits(c, spans[i]):
                    misfits.append(keys[i])
                    c.release()
                    c = None
                if c is not None:
                    found[i] = c
                    if tier is not self.cpu:
                        promote.append(c)
            if misfits:
                self._drop_misfits(tier, misfits)
            if promote and self.cpu is not None:
                ok = self.cpu.put(promote)
                self.metrics.inc("lmcache:num_promotions", sum(ok), tier=tier.name)
                if self._watchers:
                    self._notify("stored", self.cpu.name, [c.key for c, g in zip(promote, ok) if g])
            while m < n and found[m] is not None:
                m += 1
        # Release what lies beyond the first gap: it is unreachable as a prefix.
        for c in found[m:]:
            if c is not None:
                c.release()
        return [c for c in found[:m] if c is not None]

    def _fits(self, chunk: Chunk, span: ChunkSpan) -> bool:
        return chunk.num_tokens == span.num_tokens and chunk.nbytes == self.layout.chunk_bytes(
            span.num_tokens
        )

    def _drop_misfits(self, tier: StorageBackend, keys: list[CacheKey]) -> None:
        logger.warning(
            "tier %s returned %d chunks of the wrong size for their keys; removed",
            tier.name,
            len(keys),
        )
        self.metrics.inc("lmcache:num_corrupt_chunks", len(keys), tier=tier.name)
        try:
            tier.remove(keys)
        except Exception:
            self._tier_failed(tier, "remove")

    # ------------------------------------------------------------------ admin

    def remove(self, tokens: Sequence[int] | Any, *, cache_salt: str | None = None) -> int:
        """Remove the chunks of ``tokens`` from every tier; returns chunks removed."""
        keys = self.keys(self.spans(tokens, cache_salt=cache_salt))
        n = 0
        for tier in self.tiers:
            try:
                n += tier.remove(keys)
            except Exception:
                self._tier_failed(tier, "remove")
            else:
                if self._watchers and keys:
                    self._notify("removed", tier.name, list(keys))
        return n

    def _tier_failed(self, tier: StorageBackend, op: str) -> None:
        logger.warning("tier %s failed in %s; treating it as a miss", tier.name, op, exc_info=True)
        self.metrics.inc("lmcache:num_failures", tier=tier.name, op=op)

    def close(self) -> None:
        """Write what lower tiers have queued (up to ``blocking_timeout_secs``), then close."""
        if self.cpu is not None:
            self.cpu.on_evict = None
        for tier in self.tiers:
            try:
                if isinstance(tier, ManagedTier):
                    tier.close(self.config.blocking_timeout_secs)
                else:
                    tier.close()
            except Exception:
                logger.warning("closing tier %s failed", tier.name, exc_info=True)
        self.tiers = []
        self.pool.close()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_at_exit(ref: weakref.ref[CacheEngine]) -> None:
    engine = ref()
    if engine is not None and engine.tiers:
        try:
            engine.flush(engine.config.blocking_timeout_secs)
        except Exception:
            logger.warning("flushing lower tiers at exit failed", exc_info=True)
