"""The engine's tiers in order, and what moves chunks between them.

:class:`TierCascade` builds the tiers from the config (CPU DRAM first, then
local disk, peers and the remote store, each lower one behind write-behind
and health tracking), finds the longest prefix any tier holds and fetches it
(promoting lower-tier hits into DRAM), demotes chunks DRAM evicts to local
disk, tells ``watch`` callbacks what entered or left each tier, and treats a
failing tier as a miss. The :class:`~lmcache_core.engine.CacheEngine` owns one
and keeps keys, lookups with pins, and the copies to and from engine memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

from lmcache_core.auth import require_secret
from lmcache_core.backends.base import BackendContext, StorageBackend
from lmcache_core.backends.cpu import LocalCPUBackend
from lmcache_core.config import CacheConfig
from lmcache_core.keys import CacheKey, ChunkSpan
from lmcache_core.layout import KVLayout
from lmcache_core.metrics import Metrics
from lmcache_core.plugins import BACKENDS, load_plugin
from lmcache_core.pool import Chunk
from lmcache_core.tier import ManagedTier

logger = logging.getLogger("lmcache_core.engine")

#: ``watch`` callbacks: ``(event, tier name, keys)``, event "stored" or "removed".
Watcher = Callable[[str, str, list[CacheKey]], None]


def configured_tier_names(config: CacheConfig) -> list[str]:
    """The names the tiers :meth:`TierCascade._build` makes from ``config`` will have, without
    making them (for a process that shows their metrics but holds none: vLLM's API server).
    With ``server_url`` the server's tiers, which only the server knows: ``["server"]``."""
    if config.server_url:
        return ["server"]
    names = ["cpu"] if config.local_cpu else []
    if config.local_disk:
        names.append("disk")
    if config.enable_p2p:
        names.append("p2p")
    if config.remote_url:
        scheme = urlparse(config.remote_url).scheme.lower()
        try:
            names.append(str(load_plugin(BACKENDS, scheme).name))
        except Exception:
            names.append(scheme)
    return names


class TierCascade:
    """The tiers of one engine, walked in order."""

    def __init__(
        self,
        config: CacheConfig,
        context: BackendContext,
        tiers: Sequence[StorageBackend] | None = None,
        *,
        cpu: LocalCPUBackend | None = None,
    ) -> None:
        """``tiers``: use these as they are (tests); ``cpu``: a DRAM tier shared with other
        cascades (an ``lmcache server``'s, one cascade per namespace), whose evictions its
        owner routes to :meth:`on_cpu_evict` of the cascade a chunk belongs to."""
        self.context = context
        self.metrics: Metrics = context.metrics
        self.layout: KVLayout | None = context.layout
        self.cpu: LocalCPUBackend | None = None
        self._shared_cpu = False
        self._demote_to: StorageBackend | None = None
        self._evict_listeners: list[Any] = []
        self._watchers: list[Watcher] = []
        if tiers is not None:
            self.tiers = list(tiers)
            for t in self.tiers:
                if isinstance(t, LocalCPUBackend):
                    self.cpu = t
        else:
            self.tiers = self._build(config, cpu)
        #: Where chunks read from a tier live: DRAM slots the CPU tier can adopt.
        self.allocate = self.cpu.allocate if self.cpu is not None else context.pool.allocate

    def _build(
        self, config: CacheConfig, shared_cpu: LocalCPUBackend | None = None
    ) -> list[StorageBackend]:
        """CPU (synchronous, zero-copy), then disk and remote behind write-behind and health."""
        tiers: list[StorageBackend] = []
        if shared_cpu is not None:
            self.cpu = shared_cpu
            tiers.append(shared_cpu)
        elif config.local_cpu:
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
            remote_cls = load_plugin(BACKENDS, scheme)
            if remote_cls.capabilities.shared:
                # A frame store refuses by itself; a third party's shared tier that is
                # not one is refused here, before it is built: the same default for all.
                require_secret(
                    config, self.context.secret, f"the shared tier remote_url={config.remote_url!r}"
                )
            lower.append(remote_cls.from_config(config, self.context))
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
        if (
            shared_cpu is None
            and self.cpu is not None
            and (self._demote_to is not None or self._evict_listeners)
        ):
            self.cpu.on_evict = self.on_cpu_evict
        self._shared_cpu = shared_cpu is not None
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
        if self.cpu is not None and self.cpu.on_evict is None and not self._shared_cpu:
            self.cpu.on_evict = self.on_cpu_evict
        for tier in self.tiers:
            backend = tier.backend if isinstance(tier, ManagedTier) else tier
            if hasattr(backend, "on_evict") and backend is not self.cpu:
                backend.on_evict = lambda key, name=tier.name: self.notify("removed", name, [key])

    def notify(self, event: str, tier: str, keys: list[CacheKey]) -> None:
        for callback in self._watchers:
            try:
                callback(event, tier, keys)
            except Exception:
                logger.warning("a cache watcher failed on %s %s", event, tier, exc_info=True)

    def on_cpu_evict(self, chunk: Chunk, may_demote: bool) -> None:
        """The DRAM tier evicts ``chunk`` of this cascade: demote it, tell watchers.

        Demoted first, so a watcher hears of the disk copy ("stored" on disk)
        before the DRAM copy goes ("removed" on cpu): a router never sees the
        chunk held nowhere, and a watcher that forgets chunks held in no tier
        (vLLM's :class:`WorkerEvents`) still knows the chunk when its disk
        store is announced.
        """
        for listener in self._evict_listeners:  # e.g. the p2p tier unpublishes it
            listener.evicted_upstream(chunk.key)
        if may_demote and self._demote_to is not None:
            self._demote(chunk)
        if self._watchers:
            self.notify("removed", self.cpu.name if self.cpu else "cpu", [chunk.key])

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
        ok = tier.put([chunk])
        if ok[0]:
            self.metrics.inc("lmcache:num_demotions", tier=tier.name)
            self.stored(tier, [chunk], ok)  # a write to disk is announced like any other

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued lower-tier write is done; False on timeout."""
        ok = True
        for tier in self.tiers:
            if isinstance(tier, ManagedTier):
                ok = tier.flush(timeout) and ok
        return ok

    def prefix_present(self, keys: list[CacheKey]) -> int:
        """How many leading ``keys`` some tier holds."""
        n = len(keys)
        if self.tiers and self.tiers[0] is self.cpu:
            # Fast path: walk the DRAM index until the first miss.
            first = self.cpu.prefix_length(keys)
            if first == n or len(self.tiers) == 1:
                return first
        m = 0
        for ok in self.present(keys):
            if not ok:
                break
            m += 1
        return m

    def present(self, keys: list[CacheKey]) -> list[bool]:
        """Whether some tier holds each of ``keys``: one ``contains`` per tier, for the keys
        no tier above it holds (a tier that fails counts as holding none)."""
        out = [False] * len(keys)
        for tier in self.tiers:
            idx = [i for i, ok in enumerate(out) if not ok]
            if not idx:
                break
            try:
                found = tier.contains([keys[i] for i in idx])
            except Exception:
                self.tier_failed(tier, "contains")
                continue
            for i, ok in zip(idx, found):
                if ok:
                    out[i] = True
        return out

    def get_prefix(
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
                got = tier.get([keys[i] for i in idx], self.allocate)
            except Exception:
                self.tier_failed(tier, "get")
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
                    self.notify("stored", self.cpu.name, [c.key for c, g in zip(promote, ok) if g])
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
            self.tier_failed(tier, "remove")

    def tier_failed(self, tier: StorageBackend, op: str) -> None:
        logger.warning("tier %s failed in %s; treating it as a miss", tier.name, op, exc_info=True)
        self.metrics.inc("lmcache:num_failures", tier=tier.name, op=op)

    def remove(self, keys: list[CacheKey]) -> int:
        """Remove ``keys`` from every tier; returns chunks removed."""
        n = 0
        for tier in self.tiers:
            try:
                n += tier.remove(keys)
            except Exception:
                self.tier_failed(tier, "remove")
            else:
                if self._watchers and keys:
                    self.notify("removed", tier.name, list(keys))
        return n

    def close(self, timeout: float) -> None:
        """Write what lower tiers have queued (up to ``timeout`` seconds), then close them."""
        if self.cpu is not None and not self._shared_cpu:
            self.cpu.on_evict = None
        for tier in self.tiers:
            if self._shared_cpu and tier is self.cpu:
                continue  # its owner closes it
            try:
                if isinstance(tier, ManagedTier):
                    tier.close(timeout)
                else:
                    tier.close()
            except Exception:
                logger.warning("closing tier %s failed", tier.name, exc_info=True)
        self.tiers = []

    def stored(self, tier: StorageBackend, chunks: Sequence[Chunk], ok: Sequence[bool]) -> None:
        """Tell the watchers which of ``chunks`` ``tier`` accepted."""
        if self._watchers:
            done = [c.key for c, good in zip(chunks, ok) if good]
            if done:
                self.notify("stored", tier.name, done)
