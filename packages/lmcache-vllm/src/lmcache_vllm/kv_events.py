"""KV cache events for cache-aware routers: what lmcache holds, in vLLM's own block hashes.

A router (llm-d's KV-cache manager, the production stack's KV-aware router)
subscribes to vLLM's event publisher (``--kv-events-config``) and indexes
``BlockStored``/``BlockRemoved`` by block hash and medium, hashing incoming
prompts the way vLLM does to find the instance that holds their prefix. So
lmcache speaks vLLM's hashes, not its own chunk keys:

* the scheduler puts the request's block hashes (``Request.block_hashes``,
  which vLLM computes for connectors) and tokens into each save it plans,
  only when events are on (:class:`BlockInfo`);
* the worker remembers, per chunk key, the blocks that chunk covers, and
  turns the engine's ``watch`` reports (a chunk stored into or removed from
  a tier) into ``BlockStored``/``BlockRemoved`` with the tier as medium:
  ``CPU`` (vLLM's own name for host memory), ``DISK``, ``REMOTE`` (a shared
  store every instance reads); the p2p tier (another instance's memory) is
  that instance's to report;
* vLLM gathers the workers' events each step; the scheduler publishes an
  event once every tensor-parallel rank has reported it (a prefix is usable
  only when all ranks hold their shard), across steps, since ranks evict at
  slightly different times.
"""

from __future__ import annotations

import threading
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from lmcache_core.keys import CacheKey
from vllm.distributed.kv_events import (
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)

#: Tier name -> medium in events; tiers not named here are shared stores.
MEDIUMS = {"cpu": "CPU", "disk": "DISK"}
#: Tiers whose chunks are another instance's to report.
UNREPORTED = frozenset({"p2p"})
#: Chunks remembered for their block hashes, at most (oldest forgotten first).
MAX_TRACKED_CHUNKS = 1 << 16
#: Events waiting for the other ranks, at most (a dead rank must not grow it forever).
MAX_WAITING_EVENTS = 1 << 17


def events_enabled(vllm_config: Any) -> bool:
    cfg = getattr(vllm_config, "kv_events_config", None)
    return bool(cfg is not None and cfg.enable_kv_cache_events)


@dataclass
class BlockInfo:
    """What a save carries for events: vLLM's hashes of the request's full blocks, its tokens."""

    block_hashes: list[Any]  # ExternalBlockHash: bytes, or int with VLLM_KV_EVENTS_USE_INT_...
    token_ids: list[int]
    lora_id: int | None = None
    lora_name: str | None = None


def block_info(request: Any, num_tokens: int, block_size: int) -> BlockInfo:
    """The :class:`BlockInfo` of the first ``num_tokens`` tokens of ``request``."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    hashes = list(getattr(request, "block_hashes", []) or [])[: num_tokens // block_size]
    lora = getattr(request, "lora_request", None)
    return BlockInfo(
        [maybe_convert_block_hash(h) for h in hashes],
        list(request.prompt_token_ids[:num_tokens]),
        lora.adapter_id if lora else None,
        lora.name if lora else None,
    )


class LMCacheKVEvents(KVConnectorKVEvents):
    """The container vLLM carries from the workers to the scheduler (all ranks' events)."""

    def __init__(self, events: list[KVCacheEvent] | None = None, num_workers: int = 1) -> None:
        self._events = list(events or [])
        self._workers = num_workers

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._events.extend(events)

    def aggregate(self) -> LMCacheKVEvents:
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self._events)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._events.clear()
        self._workers = 1


class _Tracked:
    __slots__ = ("block_size", "hashes", "lora_id", "lora_name", "parent", "tiers", "tokens")

    def __init__(self, hashes, parent, tokens, block_size, lora_id, lora_name) -> None:  # type: ignore[no-untyped-def]
        self.hashes = hashes
        self.parent = parent
        self.tokens = tokens
        self.block_size = block_size
        self.lora_id = lora_id
        self.lora_name = lora_name
        self.tiers: set[str] = set()


class WorkerEvents:
    """One worker's events: chunk keys mapped to vLLM blocks, fed by the engine's ``watch``."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._lock = threading.Lock()
        self._tracked: OrderedDict[CacheKey, _Tracked] = OrderedDict()
        self._pending: list[KVCacheEvent] = []

    def expect(self, key: CacheKey, start: int, end: int, info: BlockInfo) -> None:
        """Chunk ``key`` holds tokens ``[start, end)`` of the request ``info`` describes."""
        bs = self.block_size
        first, last = start // bs, min(end // bs, len(info.block_hashes))
        if last <= first:
            return  # no full block in this chunk: vLLM hashes full blocks only
        tracked = _Tracked(
            info.block_hashes[first:last],
            info.block_hashes[first - 1] if first else None,
            array("q", info.token_ids[first * bs : last * bs]),
            bs,
            info.lora_id,
            info.lora_name,
        )
        with self._lock:
            old = self._tracked.pop(key, None)
            if old is not None:
                tracked.tiers = old.tiers
            self._tracked[key] = tracked
            while len(self._tracked) > MAX_TRACKED_CHUNKS:
                self._tracked.popitem(last=False)

    def __call__(self, event: str, tier: str, keys: list[CacheKey]) -> None:
        """The engine's ``watch`` callback."""
        if tier in UNREPORTED:
            return
        medium = MEDIUMS.get(tier, "REMOTE")
        with self._lock:
            for key in keys:
                t = self._tracked.get(key)
                if t is None:
                    continue
                if event == "stored":
                    if tier in t.tiers:
                        continue
                    t.tiers.add(tier)
                    self._pending.append(
                        BlockStored(
                            block_hashes=list(t.hashes),
                            parent_block_hash=t.parent,
                            token_ids=t.tokens.tolist(),
                            block_size=t.block_size,
                            lora_id=t.lora_id,
                            medium=medium,
                            lora_name=t.lora_name,
                        )
                    )
                elif tier in t.tiers:
                    t.tiers.discard(tier)
                    self._pending.append(BlockRemoved(block_hashes=list(t.hashes), medium=medium))
                    if not t.tiers:
                        del self._tracked[key]

    def take(self) -> LMCacheKVEvents | None:
        with self._lock:
            events, self._pending = self._pending, []
        return LMCacheKVEvents(events) if events else None


class EventGate:
    """Scheduler side: an event is published once ``world_size`` ranks have reported it."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._counts: Counter[KVCacheEvent] = Counter()
        self._ready: list[KVCacheEvent] = []

    def add(self, events: KVConnectorKVEvents) -> None:
        for event in events.get_all_events():
            self._counts[event] += 1
            if self._counts[event] >= self.world_size:
                del self._counts[event]
                self._ready.append(event)
        while len(self._counts) > MAX_WAITING_EVENTS:
            del self._counts[next(iter(self._counts))]

    def take(self) -> list[KVCacheEvent]:
        ready, self._ready = self._ready, []
        return ready
