"""The worker side of the vLLM connector: one rank's cache, its loads and stores.

It owns the :class:`~lmcache_core.CacheEngine` of its rank, serves the
scheduler's lookups, loads before the forward pass (``start_load_kv``) and
stores after it (``wait_for_save``); with blending, it runs the blend pass
(:mod:`lmcache_vllm.blend.worker`).

Saves do not hold up the step on a GPU (``async_saves``, see
:func:`lmcache_vllm.settings.async_saves`): ``wait_for_save`` queues the
gather on a side stream after the step's kernels and returns; the chunks
reach the tiers when the copy is done (polled every step). Until then the
blocks it reads must not be rewritten: a request that finishes keeps them
until ``get_finished`` reports it (:mod:`lmcache_vllm.save_tracker`), and a
request preempted while saving makes the step's metadata say ``fence``:
``start_load_kv`` then orders vLLM's stream after every queued copy (on the
GPU; the host does not wait). On the CPU backend copies are synchronous and
each save is committed in its own step.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import lmcache_cuda
import torch
from lmcache_core.adapter_kit import CacheInstance, open_cache
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import ChunkedPrompt
from lmcache_core.staged_load import StagedLoad
from lmcache_core.staged_store import SaveQueue, StagedStore
from lmcache_cuda.layerwise import LayerMemories, LayerwiseReader, LayerwiseWriter
from lmcache_cuda.pinned import dram_tier_arena, pin_server_arena

from lmcache_vllm.kv_events import WorkerEvents, events_enabled
from lmcache_vllm.layouts import detect_layout, ordered_layers
from lmcache_vllm.lookup import LookupServer
from lmcache_vllm.metadata import LMCacheConnectorMetadata
from lmcache_vllm.request_keys import namespace_extra
from lmcache_vllm.save_tracker import SaveTracker
from lmcache_vllm.settings import (
    async_saves,
    check_chunk_size,
    check_parallelism,
    checked_kv_spec,
    load_cache_config,
    model_id,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# A child of vLLM's logger, so these lines appear in vLLM's log stream.
logger = logging.getLogger("vllm.lmcache")

#: Worker sides alive in this process (for tests and debugging tools).
WORKERS: list[WorkerSide] = []


class WorkerSide:
    """What each worker does: own its rank's cache, load and store KV."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        tc = vllm_config.kv_transfer_config
        self.extra = tc.kv_connector_extra_config
        self.config = load_cache_config(self.extra)
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.block_size = vllm_config.cache_config.block_size
        check_chunk_size(self.config, self.block_size)
        self.engine: CacheEngine | None = None
        self.cache: CacheInstance | None = None
        self.rank = 0
        self.server: LookupServer | None = None
        self.metrics_server: Any = None
        self.layers: list[torch.Tensor] = []
        self._paged: Any = None  # block_ids -> reader/writer (lmcache-cuda's kernels)
        self._fence: Any = None  # orders vLLM's stream after queued save copies (GPU)
        self.saves: SaveQueue | None = None
        self.async_saves = async_saves(vllm_config)
        self.tracker = SaveTracker(self.async_saves)
        #: use_layerwise: per-layer copies at vLLM's wait_for_layer_load / save_kv_layer.
        self.layerwise = self.config.use_layerwise
        self._layer_mem: LayerMemories | None = None
        self._step_writers: list[LayerwiseWriter] = []
        self._step_readers: list[LayerwiseReader] = []
        self._held_loads: list[StagedLoad] = []
        self._failed_blocks: set[int] = set()
        #: Requests whose load this step fell short: their blocks past what landed hold
        #: another request's KV (and the step's tokens after them attend to it), so
        #: nothing of theirs is stored this step (vLLM recomputes them).
        self._short: set[str] = set()
        #: This step's staged saves, by request (to discard a request's if its
        #: layer-wise load fails after they were staged).
        self._step_staged: list[tuple[str, StagedStore]] = []
        self.blend: Any = None  # BlendWorker when enable_blending
        #: KV cache events for routers, when vLLM publishes events (--kv-events-config).
        self.events = WorkerEvents(self.block_size) if events_enabled(vllm_config) else None
        #: The last transfers, newest last: ("load"|"save", req_id, block_ids, tokens).
        self.recent: deque[tuple[str, str, list[int], tuple[int, int]]] = deque(maxlen=64)
        WORKERS.append(self)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        check_parallelism(self.vllm_config)
        spec = checked_kv_spec(self.kv_cache_config, self.config)
        layout = detect_layout(
            kv_caches,
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
        )
        self.layers = [t for _, t in ordered_layers(kv_caches)]
        # C kernels for the CPU backend, CUDA kernels into pinned memory on GPUs;
        # the torch reference where a kernel library is missing.
        self._paged = lmcache_cuda.paged_memory(layout, self.layers)
        self._fence = getattr(self._paged, "fence_saves", None)
        if self.layerwise:
            names = [name for name, _ in ordered_layers(kv_caches)]
            self._layer_mem = LayerMemories(layout, self.layers, names, whole=self._paged)
        rank = self.rank = get_tensor_model_parallel_rank()
        world = get_tensor_model_parallel_world_size()
        on_gpu = self.layers[0].device.type == "cuda"
        # In this process, or on the host's lmcache server (server_url): on a GPU the
        # DRAM arena (ours, or our mapping of the server's) is pinned for the kernels.
        self.cache = open_cache(
            self.config,
            model=model_id(self.vllm_config, self.config, self.extra),
            key_extra=namespace_extra(self.vllm_config),
            layout=layout,
            world_size=world,
            rank=rank,
            arena=(lambda: dram_tier_arena(self.config.max_local_cpu_size)) if on_gpu else None,
            on_map=pin_server_arena if on_gpu else None,
            exporter_rank=rank,
            client_info={"engine": "vllm"},
        )
        self.engine = self.cache.engine
        self.saves = SaveQueue(self.engine, on_commit=self._saved)
        if self.events is not None:
            self.engine.watch(self.events)
        if self.config.enable_blending:
            from lmcache_vllm.blend.worker import blend_worker  # only when blending

            self.blend = blend_worker(self.vllm_config, self.engine, kv_caches, world)
        self.server = LookupServer(
            self.vllm_config.kv_transfer_config.engine_id,
            rank,
            self._lookup,
            self.engine.unpin,
            self._lookup_chains,
            self._lookup_prompts,
            self.engine.hit_sources,
        )
        self.metrics_server = self.cache.exporter
        logger.info(
            "lmcache: rank %d/%d caches %s KV (%s, %d layers) in %d chunks of %d tokens; tiers: %s",
            rank,
            world,
            layout.dtype,
            layout.kind.value,
            layout.num_layers,
            self.engine.chunk_store.num_slots,
            self.config.chunk_size,
            ", ".join(self.engine.chunk_store.tier_names),
        )

    def _lookup_chains(self, chunk_size: int, chains: list[list[bytes]], owner: str) -> list[int]:
        if self.blend is None or chunk_size != self.config.chunk_size:
            return [0] * len(chains)
        return self.blend.lookup(chains, owner)

    def _lookup_prompts(self, chunk_size: int, chains: list[list[bytes]], owner: str) -> list[int]:
        assert self.engine is not None
        if chunk_size != self.config.chunk_size:
            return [0] * len(chains)
        ns = self.engine.namespace
        return self.engine.lookup_chains([ChunkedPrompt(chunk_size, 0, c).keys(ns) for c in chains],
                                         pin_owner=owner, aliases=True)  # fmt: skip

    def _lookup(self, chunk_size: int, num_tokens: int, digests: list[bytes], owner: str) -> int:
        assert self.engine is not None
        prompt = ChunkedPrompt(chunk_size, num_tokens, digests)
        return self.engine.lookup_chunks(prompt, pin_owner=owner)

    def kv(self, block_ids: list[int]) -> Any:
        """Reader/writer over this worker's KV tensors for one request's blocks."""
        assert self.engine is not None
        return self._paged(block_ids)

    def start_load_kv(self, meta: LMCacheConnectorMetadata) -> None:
        """Before the step's forward pass: blend loads, prefix loads, and (layer-wise)
        the slots of the step's saves, whose layers are copied after each attention."""
        if self.engine is None:
            return
        self.poll_saves()
        self._short, self._step_staged = set(), []
        if meta.fence and self._fence is not None:
            self._fence()  # a preempted request's blocks, still being saved, are reused
            if self._layer_mem is not None:
                self._layer_mem.fence()
        for bspec in meta.blend_loads:
            self._blend_load(bspec)
        for spec in meta.loads:
            self._load(spec)
        if self._layer_mem is not None:
            self._stage_layerwise_saves(meta.saves)

    def _load(self, spec: Any) -> None:
        """Load one request's cached prefix into its blocks; blocks left short are
        reported to vLLM, which recomputes them."""
        assert self.engine is not None
        t0 = time.perf_counter()
        if spec.found_past_own_keys:
            self.engine.metrics.inc("lmcache:num_lookup_hits", spec.found_past_own_keys)
        got = self._retrieve(spec)
        self.recent.append(("load", spec.req_id, spec.block_ids, (spec.load_from, got)))
        if got > spec.load_from:
            self._learn_inner_keys(spec)
            logger.info(
                "lmcache: loaded tokens [%d, %d) of %s in %.1f ms",
                spec.load_from,
                got,
                spec.req_id,
                (time.perf_counter() - t0) * 1e3,
            )
        if got < spec.load_until:
            self._load_fell_short(spec, got)

    def _retrieve(self, spec: Any) -> int:
        """Write the request's cached tokens: whole now, or layer by layer (held until
        each layer lands); returns the end of what is (or will be) in its blocks."""
        assert self.engine is not None
        if self._layer_mem is None:
            return self.engine.retrieve(
                spec.prompt.prompt(),
                self.kv(spec.block_ids),
                write_from=spec.load_from,
                max_tokens=spec.load_until,
                pin_owner=spec.req_id,
            )
        bs = self.block_size
        writer = LayerwiseWriter(self._layer_mem, spec.block_ids)
        writer.req_id = spec.req_id
        writer.blocks_if_failed = spec.block_ids[spec.load_from // bs : -(-spec.load_until // bs)]
        got, held = self.engine.retrieve_async(
            spec.prompt.prompt(),
            writer,
            write_from=spec.load_from,
            max_tokens=spec.load_until,
            pin_owner=spec.req_id,
        )
        if held is not None:
            self._held_loads.append(held)
            self._step_writers.append(writer)
        return got

    def _load_fell_short(self, spec: Any, got: int) -> None:
        bs = self.block_size
        first_bad = max(spec.load_from, got) // bs
        bad = spec.block_ids[first_bad : -(-spec.load_until // bs)]
        logger.warning(
            "lmcache: loaded %d of tokens [%d, %d) for %s; vLLM recomputes %d blocks",
            max(0, got - spec.load_from),
            spec.load_from,
            spec.load_until,
            spec.req_id,
            len(bad),
        )
        self._failed_blocks.update(bad)
        self._short.add(spec.req_id)
        self.recent.append(("failed", spec.req_id, bad, (got, spec.load_until)))

    def _stage_layerwise_saves(self, saves: Any) -> None:
        """Slots for the step's saves now; each layer is copied after its attention."""
        assert self._layer_mem is not None
        for spec in saves:
            if spec.req_id in self._short:
                continue  # its blocks past the short load hold another request's KV
            reader = LayerwiseReader(self._layer_mem, spec.block_ids)
            if self._stage_save(spec, reader):
                self._step_readers.append(reader)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._layer_mem is None or not self._step_writers:
            return
        i = self._layer_mem.index.get(layer_name)
        if i is None:  # not a layer of this cache (a draft model's): nothing to wait for
            return
        for writer in self._step_writers:
            writer.wait_layer(i)

    def save_kv_layer(self, layer_name: str) -> None:
        if self._layer_mem is None or not self._step_readers:
            return
        i = self._layer_mem.index.get(layer_name)
        if i is None:
            return
        for reader in self._step_readers:
            reader.read_layer(i)

    def _blend_load(self, spec: Any) -> None:
        try:
            if self.blend is None:
                raise RuntimeError("a blend load reached a worker without blending")
            self.blend.load(spec)
            self.recent.append(("blend", spec.req_id, spec.block_ids, (spec.start, spec.until)))
        except Exception:
            bs = self.block_size
            bad = spec.block_ids[spec.start // bs : -(-spec.until // bs)]
            logger.exception(
                "lmcache: blending %s failed; vLLM recomputes %d blocks", spec.req_id, len(bad)
            )
            if self.engine is not None:
                self.engine.unpin(spec.req_id)
            self._failed_blocks.update(bad)
            self._short.add(spec.req_id)
            self.recent.append(("failed", spec.req_id, bad, (spec.start, spec.until)))

    def wait_for_save(self, meta: LMCacheConnectorMetadata) -> None:
        # First, whatever happens next: the scheduler side delays these requests.
        self.tracker.planned(s.req_id for s in meta.saves)
        self.tracker.planned(s.req_id for s in meta.blend_saves)
        if self.engine is None:
            return
        for bspec in meta.blend_saves:
            if bspec.req_id in self._short:
                continue  # its blend load failed: its blocks are not what was computed
            try:
                if self.blend is not None:
                    self.blend.save(bspec)
                    self.recent.append(("blend_save", bspec.req_id, bspec.block_ids, (0, 0)))
            except Exception:
                logger.exception("lmcache: storing the segments of %s failed", bspec.req_id)
        if self._layer_mem is not None:
            for writer in self._step_writers:
                writer.finish()  # layers vLLM did not wait for
                if writer.error is not None:
                    logger.error(
                        "lmcache: a layer-wise load failed (%s); vLLM recomputes %d blocks",
                        writer.error,
                        len(writer.blocks_if_failed),
                    )
                    self._failed_blocks.update(writer.blocks_if_failed)
                    self._short.add(writer.req_id)
            for reader in self._step_readers:
                reader.finish()  # the saves staged in start_load_kv: every layer copied
            self._step_writers, self._step_readers = [], []
            # A layer-wise load that failed after its request's save was staged: that
            # save copied the blocks the load never filled; it is dropped, not stored.
            failed = [st for rid, st in self._step_staged if rid in self._short]
            if failed and self.saves is not None:
                self.saves.discard(failed)
        else:
            for spec in meta.saves:
                if spec.req_id in self._short:
                    continue  # its blocks past the short load hold another request's KV
                self._stage_save(spec, self.kv(spec.block_ids))
        self._step_staged = []
        if self.saves is not None and not self.async_saves:
            self.saves.drain()  # synchronous saves: committed before the step ends
        self.poll_saves()

    def get_finished(self, finished_req_ids: set[str]) -> set[str]:
        """Finished requests whose blocks vLLM kept for their saves and may free now."""
        try:
            self.poll_saves()
        except Exception:
            logger.exception("lmcache: committing finished saves failed")
        busy = self.saves.owners() if self.saves is not None else set()
        return self.tracker.done(finished_req_ids, busy)

    def _stage_save(self, spec: Any, reader: Any) -> bool:
        """Start storing a save spec's chunks through ``reader``; False if nothing to store."""
        assert self.engine is not None
        prompt = spec.prompt.prompt()
        first = spec.from_chunk
        if self.events is not None and spec.blocks is not None:
            for i, key in enumerate(prompt.keys(self.engine.namespace)[first:], first):
                self.events.expect(key, prompt.start(i), prompt.end(i), spec.blocks)
        staged = self.engine.store_async(prompt, reader, from_chunk=first, tenant=spec.tenant)
        self._learn_inner_keys(spec)
        self.recent.append(("save", spec.req_id, spec.block_ids, (0, spec.prompt.num_tokens)))
        if staged is None or self.saves is None:
            return False
        self.saves.add(spec.req_id, staged)
        self._step_staged.append((spec.req_id, staged))
        return True

    def _learn_inner_keys(self, spec: Any) -> None:
        """Register a save's or load's chunks' first-block keys (lmcache_core.chunk_aliases)."""
        if self.engine is None or not spec.inner or spec.inner_step <= 0:
            return
        try:
            self.engine.add_aliases(spec.prompt.prompt(), spec.inner, spec.inner_step)
        except ValueError:
            logger.exception("lmcache: bad inner-prefix keys for %s; ignored", spec.req_id)

    def poll_saves(self) -> int:
        """Commit the saves whose copies are done (all of them on the CPU backend), and
        free the chunks of layer-wise loads that have landed."""
        if self._held_loads:
            landed = [h for h in self._held_loads if h.done()]
            self._held_loads = [h for h in self._held_loads if not h.done()]
            for h in landed:
                h.release()
        return self.saves.poll() if self.saves is not None else 0

    def _saved(self, req_id: str, staged: StagedStore, stored: int) -> None:
        if stored:
            logger.info(
                "lmcache: stored %d new tokens of %s in %.1f ms of host time",
                stored,
                req_id,
                staged.host_seconds * 1e3,
            )

    def take_failed_blocks(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def close(self) -> None:
        for held in self._held_loads:
            held.release()
        self._held_loads = []
        if self.saves is not None:
            try:
                self.saves.drain()
            except Exception:
                logger.exception("lmcache: committing the last saves failed")
            self.saves = None
        if self.server is not None:
            self.server.close()
            self.server = None
        self.metrics_server = None
        if self.cache is not None:
            self.cache.close()  # the exporter, then the engine
            self.cache = None
        self.engine = None
        if self in WORKERS:
            WORKERS.remove(self)
