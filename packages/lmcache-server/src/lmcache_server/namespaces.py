"""The server's chunks: one DRAM tier for everyone, one store per key namespace.

Every client names a key namespace (model, KV layout, chunk size, rank, ...),
which the server derives from what the client describes, never from a digest
the client sends. Each namespace gets a
:class:`~lmcache_core.chunk_store.LocalChunkStore` of its own: its lower tiers
(a disk tier keeps to its namespace's folder, a remote tier checks frames of
its layout), its aliases and pins. The DRAM tier is shared: one pool over the
shared arena and one index, so the engines of a host share memory and
eviction across models, ranks and tenants, and a chunk stored by one engine
is found by every other with the same namespace (two vLLM replicas of one
model, a vLLM and an SGLang).

Decision: the pool has one slot size. It is ``server_slot_size`` when set,
else the first client's chunk size, so a server for one model wastes
nothing. A client whose chunks are larger is refused with what to set; a
smaller one fills part of each slot (the status reports how much).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from lmcache_core.auth import load_secret, shared_tier_problems
from lmcache_core.backends.base import BackendContext
from lmcache_core.backends.cpu import LocalCPUBackend
from lmcache_core.cache_key import NAMESPACE_DIGEST_SIZE, KeyNamespace
from lmcache_core.chunk_store import LocalChunkStore
from lmcache_core.config import CacheConfig
from lmcache_core.errors import ConfigError
from lmcache_core.eviction.base import EvictionPolicy
from lmcache_core.metrics import Metrics
from lmcache_core.mp.shared_memory import SharedArena
from lmcache_core.plugins import EVICTION_POLICIES, load_plugin
from lmcache_core.pool import SLOT_OFFSET, Chunk, SlotPool
from lmcache_core.sizes import format_size

from lmcache_server.quotas import TenantQuotas

logger = logging.getLogger(__name__)


class RefusedClient(Exception):
    """A client the server cannot serve (the message says what to change)."""


@dataclass
class Namespace:
    """One key namespace's store, and who uses it."""

    spec: KeyNamespace
    store: LocalChunkStore
    #: Serialises the store's operations (sessions run on their own threads).
    lock: threading.RLock = field(default_factory=threading.RLock)
    sessions: int = 0


class NamespaceRegistry:
    """The shared DRAM tier and the store of every namespace a client has named."""

    def __init__(self, config: CacheConfig, metrics: Metrics, *, shm_name: str | None = None):
        self.config = config
        self.metrics = metrics
        self.secret = load_secret(config)
        # Shared tiers are built per namespace, at a client's first HELLO: refuse a
        # config that would fail there now, at start, with what to set.
        refused = shared_tier_problems(config, self.secret)
        if refused:
            raise ConfigError(refused)
        size = config.max_local_cpu_size + SLOT_OFFSET
        try:
            self.arena = SharedArena(size, shm_name=shm_name, prefault=config.local_cpu_prefault)
        except OSError as e:
            raise ConfigError(
                [
                    f"max_local_cpu_size={format_size(config.max_local_cpu_size)} cannot be "
                    f"reserved as shared memory ({e.strerror}); lower it, or raise the shared "
                    "memory limit (/dev/shm, a container's shm-size)"
                ]
            ) from None
        self.pool: SlotPool | None = None
        self.cpu: LocalCPUBackend | None = None
        self.quotas = TenantQuotas.from_config(config)
        self._lock = threading.Lock()
        self._namespaces: dict[bytes, Namespace] = {}

    # ------------------------------------------------------------------ registration

    def open(self, spec: KeyNamespace) -> Namespace:
        """The namespace ``spec`` names, made on first use; RefusedClient if it cannot fit."""
        need = spec.layout.chunk_bytes(spec.chunk_size)
        with self._lock:
            if self.pool is None:
                self._make_pool(need)
            assert self.pool is not None and self.cpu is not None
            if need > self.pool.slot_bytes:
                raise RefusedClient(
                    f"this server's slots hold {format_size(self.pool.slot_bytes)}; a chunk of "
                    f"{spec.model} ({spec.chunk_size} tokens) is {format_size(need)}. Set "
                    f"server_slot_size to at least {format_size(need)} on the server (it serves "
                    "every model whose chunks fit), or run a server per model"
                )
            ns = self._namespaces.get(spec.digest)
            if ns is None:
                context = BackendContext(
                    layout=spec.layout,
                    pool=self.pool,
                    metrics=self.metrics,
                    secret=self.secret,
                    namespace=spec.digest,
                )
                config = self.config.replace(chunk_size=spec.chunk_size)
                ns = Namespace(spec, LocalChunkStore(config, context, cpu=self.cpu))
                self._namespaces[spec.digest] = ns
                self.metrics.declare(tier=list(ns.store.tier_names))  # zero series per tier
                logger.info(
                    "lmcache server: namespace %s for %s (rank %d/%d, %s, tiers: %s)",
                    spec.digest.hex()[:12],
                    spec.model,
                    spec.rank,
                    spec.world_size,
                    spec.layout.kind.value,
                    ", ".join(ns.store.tier_names),
                )
            ns.sessions += 1
            return ns

    def leave(self, ns: Namespace) -> None:
        with self._lock:
            ns.sessions -= 1

    def _make_pool(self, first_chunk_bytes: int) -> None:
        slot = int(getattr(self.config, "server_slot_size", 0) or 0) or first_chunk_bytes
        self.pool = SlotPool(self.arena, slot)
        policy: EvictionPolicy = load_plugin(EVICTION_POLICIES, self.config.cache_policy)()
        self.cpu = LocalCPUBackend(
            self.pool, policy, self.metrics, checksums=self.config.local_cpu_checksums
        )
        self.cpu.on_evict = self._route_eviction
        self.quotas.attach(self.cpu)
        logger.info(
            "lmcache server: DRAM tier of %s in %d slots of %s",
            format_size(self.pool.capacity_bytes),
            self.pool.num_slots,
            format_size(self.pool.slot_bytes),
        )

    def _route_eviction(self, chunk: Chunk, may_demote: bool) -> None:
        """The shared DRAM tier evicts a chunk: its namespace's cascade demotes it."""
        self.quotas.forget(chunk.key)
        ns = self._namespaces.get(bytes(chunk.key[:NAMESPACE_DIGEST_SIZE]))
        if ns is not None:
            ns.store.cascade.on_cpu_evict(chunk, may_demote)

    # ------------------------------------------------------------------ admin

    def namespaces(self) -> list[Namespace]:
        with self._lock:
            return list(self._namespaces.values())

    def clear(self) -> int:
        """Empty the DRAM tier (chunks being read or written stay until released)."""
        cpu = self.cpu
        if cpu is None:
            return 0
        keys = list(cpu.keys())
        for key in keys:
            self.quotas.forget(key)
        return cpu.remove(keys)

    def status(self) -> dict[str, Any]:
        pool, cpu = self.pool, self.cpu
        used = cpu.used_bytes if cpu is not None else 0
        slots_used = (pool.num_slots - pool.free_slots) if pool is not None else 0
        out: dict[str, Any] = {
            "arena_bytes": self.arena.size,
            "slot_bytes": pool.slot_bytes if pool is not None else None,
            "slots": pool.num_slots if pool is not None else None,
            "slots_used": slots_used,
            "chunks": len(cpu) if cpu is not None else 0,
            "pinned_chunks": len(cpu.pinned_keys()) if cpu is not None else 0,
            "chunk_bytes": used,
            # How much of the used slots' memory holds chunk bytes (smaller models' chunks
            # and trailing partial chunks leave the rest of a slot empty).
            "slot_fill": (used / (slots_used * pool.slot_bytes)) if pool and slots_used else None,
            "namespaces": [
                {
                    "namespace": ns.spec.digest.hex(),
                    "model": ns.spec.model,
                    "rank": ns.spec.rank,
                    "world_size": ns.spec.world_size,
                    "chunk_size": ns.spec.chunk_size,
                    "layout": ns.spec.layout.kind.value,
                    "tiers": ns.store.tier_names,
                    "sessions": ns.sessions,
                }
                for ns in self.namespaces()
            ],
            "tenants": self.quotas.status(),
        }
        return out

    def flush(self, timeout: float | None) -> bool:
        ok = True
        for ns in self.namespaces():
            ok = ns.store.flush(timeout) and ok
        return ok

    def close(self, timeout: float) -> None:
        for ns in self.namespaces():
            try:
                ns.store.close(timeout)
            except Exception:
                logger.warning("closing namespace %s failed", ns.spec.digest.hex(), exc_info=True)
        if self.cpu is not None:
            self.cpu.on_evict = None
            self.cpu.close()
        if self.pool is not None:
            self.pool.close()
        else:
            self.arena.close()
