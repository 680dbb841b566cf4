"""``LMCacheKVConnector``: vLLM's v1 KV connector, backed by lmcache-core.

Load it out of tree, with no patch to vLLM::

    --kv-transfer-config '{"kv_connector": "LMCacheKVConnector",
                           "kv_connector_module_path": "lmcache_vllm",
                           "kv_role": "kv_both"}'

Two roles, as vLLM separates them:

* scheduler side (:class:`SchedulerSide`): hashes each prompt once, asks every
  tensor-parallel rank how many leading chunks it holds (the minimum counts),
  and tells the workers, in one metadata object per step, which blocks to
  load and which computed chunks to store;
* worker side (:class:`WorkerSide`): owns the :class:`~lmcache_core.CacheEngine`
  of its rank, serves the scheduler's lookups, loads before the forward pass
  (``start_load_kv``) and stores after it (``wait_for_save``).

Failures never fail a request: a lookup that cannot be answered is a miss; a
load that comes up short reports the blocks it could not fill through
``get_block_ids_with_load_errors`` and vLLM recomputes them (the connector
sets vLLM's ``kv_load_failure_policy`` to ``recompute``: for a cache, failing
the request would be wrong); a store that fails is logged and skipped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmcache_cuda
import torch
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import ChunkedPrompt, TokenChunker
from lmcache_core.layout import LayoutKind
from lmcache_core.metrics import serve_metrics
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache_vllm.layouts import detect_layout, ordered_layers
from lmcache_vllm.lookup import LookupClient, LookupServer
from lmcache_vllm.metadata import LMCacheConnectorMetadata, LoadSpec, PromptRef, SaveSpec
from lmcache_vllm.request_keys import namespace_extra, request_identity
from lmcache_vllm.settings import check_chunk_size, load_cache_config, model_id

if TYPE_CHECKING:
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# A child of vLLM's logger, so these lines appear in vLLM's log stream.
logger = logging.getLogger("vllm.lmcache")

#: Worker sides alive in this process (for tests and debugging tools).
WORKERS: list[WorkerSide] = []


def _kv_spec(kv_cache_config: KVCacheConfig) -> Any:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"lmcache supports one KV cache group (a dense attention model); this model has "
            f"{len(groups)}"
        )
    return groups[0].kv_cache_spec


# ---------------------------------------------------------------------------- scheduler side


@dataclass
class _RequestState:
    prompt: ChunkedPrompt
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    load: tuple[int, int] | None = None  # tokens [from, until) to load this step
    lookup_from: int = 0  # vLLM's own hit when we looked up
    saved_chunks: int = 0
    pinned: bool = False


class SchedulerSide:
    """What the scheduler process does: lookups and per-step load/save plans."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.config = load_cache_config(extra)
        self.block_size = vllm_config.cache_config.block_size
        check_chunk_size(self.config, self.block_size)
        self.role = vllm_config.kv_transfer_config.kv_role
        self.chunker = TokenChunker(self.config.chunk_size, self.config.hash_algorithm)
        pc = vllm_config.parallel_config
        if pc.pipeline_parallel_size > 1:
            raise ValueError("lmcache-vllm does not support pipeline parallelism yet")
        self.client = LookupClient(
            vllm_config.kv_transfer_config.engine_id,
            pc.tensor_parallel_size,
            self.config.blocking_timeout_secs,
        )
        self.requests: dict[str, _RequestState] = {}

    def _state(self, request: Request) -> _RequestState | None:
        st = self.requests.get(request.request_id)
        if st is None:
            identity = request_identity(request)
            if identity is None:
                return None
            prompt = self.chunker.chunk(
                request.prompt_token_ids,
                cache_salt=identity.cache_salt,
                adapter=identity.adapter,
                mm_items=identity.mm_items,
                include_partial=self.config.save_unfull_chunk,
                partial_multiple=self.block_size,
            )
            st = _RequestState(prompt=prompt, prompt_len=len(request.prompt_token_ids))
            self.requests[request.request_id] = st
        return st

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        if self.role == "kv_producer":
            return 0
        st = self._state(request)
        if st is None or not len(st.prompt):
            return 0
        p = st.prompt
        hits = self.client.lookup(p.chunk_size, p.num_tokens, p.digests, request.request_id)
        st.pinned = hits > 0
        hit = p.end(hits - 1) if hits else 0
        # vLLM computes at least the last prompt token; like its own prefix
        # cache, recompute the last (partial) block rather than load it.
        hit = min(hit, ((st.prompt_len - 1) // self.block_size) * self.block_size)
        st.lookup_from = num_computed_tokens
        new = max(0, hit - num_computed_tokens)
        if new == 0 and st.pinned:
            self.client.unpin(request.request_id)
            st.pinned = False
        return new

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        st = self._state(request)
        if st is None:
            return
        if num_external_tokens > 0:
            st.load = (st.lookup_from, st.lookup_from + num_external_tokens)

    def build_connector_meta(self, so: SchedulerOutput) -> LMCacheConnectorMetadata:
        meta = LMCacheConnectorMetadata()
        for new in so.scheduled_new_reqs:
            st = self.requests.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan_load(new.req_id, st, meta)
            self._plan_save(
                new.req_id, st, new.num_computed_tokens + so.num_scheduled_tokens[new.req_id], meta
            )
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.requests.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            # A preempted request comes back here, not among the new ones, and
            # may have looked up (and been promised) tokens again.
            self._plan_load(req_id, st, meta)
            done = cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0)
            self._plan_save(req_id, st, done, meta)
        return meta

    def _plan_load(self, req_id: str, st: _RequestState, meta: LMCacheConnectorMetadata) -> None:
        if st.load is None:
            return
        lo, hi = st.load
        meta.loads.append(
            LoadSpec(req_id, self._ref(st, len(st.prompt)), list(st.block_ids), lo, hi)
        )
        st.load = None
        st.pinned = False

    def _ref(self, st: _RequestState, chunks: int) -> PromptRef:
        p = st.prompt
        return PromptRef(p.chunk_size, p.end(chunks - 1) if chunks else 0, p.digests[:chunks])

    def _plan_save(
        self, req_id: str, st: _RequestState, computed: int, meta: LMCacheConnectorMetadata
    ) -> None:
        if self.role == "kv_consumer":
            return
        if computed >= st.prompt_len:
            ready = len(st.prompt)  # prefill done: every chunk, the partial one too
        else:
            ready = min(len(st.prompt), computed // self.config.chunk_size)
        if ready > st.saved_chunks:
            meta.saves.append(SaveSpec(req_id, self._ref(st, ready), list(st.block_ids)))
            st.saved_chunks = ready

    def request_finished(self, request: Request) -> None:
        st = self.requests.pop(request.request_id, None)
        if st is not None and st.pinned:
            self.client.unpin(request.request_id)

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------- worker side


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
        self.server: LookupServer | None = None
        self.metrics_server: Any = None
        self.layers: list[torch.Tensor] = []
        self._paged: Any = None  # block_ids -> reader/writer (lmcache-cuda's kernels)
        self._failed_blocks: set[int] = set()
        #: The last transfers, newest last: ("load"|"save", req_id, block_ids, tokens).
        self.recent: deque[tuple[str, str, list[int], tuple[int, int]]] = deque(maxlen=64)
        WORKERS.append(self)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        spec = _kv_spec(self.kv_cache_config)
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
        rank = get_tensor_model_parallel_rank()
        world = get_tensor_model_parallel_world_size()
        self.engine = CacheEngine(
            self.config,
            model=model_id(self.vllm_config, self.config, self.extra),
            key_extra=namespace_extra(self.vllm_config),
            layout=layout,
            world_size=world,
            rank=rank,
            arena=_pinned_arena(self.config) if self.layers[0].device.type == "cuda" else None,
        )
        self.server = LookupServer(
            self.vllm_config.kv_transfer_config.engine_id, rank, self._lookup, self.engine.unpin
        )
        if self.config.metrics_port is not None:
            self.metrics_server = serve_metrics(
                self.engine.metrics, self.config.metrics_port + rank
            )
        logger.info(
            "lmcache: rank %d/%d caches %s KV (%s, %d layers) in %d chunks of %d tokens",
            rank,
            world,
            layout.dtype,
            layout.kind.value,
            layout.num_layers,
            self.engine.pool.num_slots,
            self.config.chunk_size,
        )

    def _lookup(self, chunk_size: int, num_tokens: int, digests: list[bytes], owner: str) -> int:
        assert self.engine is not None
        prompt = ChunkedPrompt(chunk_size, num_tokens, digests)
        return self.engine.lookup_chunks(prompt, pin_owner=owner)

    def kv(self, block_ids: list[int]) -> Any:
        """Reader/writer over this worker's KV tensors for one request's blocks."""
        assert self.engine is not None
        return self._paged(block_ids)

    def start_load_kv(self, meta: LMCacheConnectorMetadata) -> None:
        if self.engine is None:
            return
        bs = self.block_size
        for spec in meta.loads:
            t0 = time.perf_counter()
            got = self.engine.retrieve(
                spec.prompt.prompt(),
                self.kv(spec.block_ids),
                write_from=spec.load_from,
                max_tokens=spec.load_until,
                pin_owner=spec.req_id,
            )
            self.recent.append(("load", spec.req_id, spec.block_ids, (spec.load_from, got)))
            if got > spec.load_from:
                logger.info(
                    "lmcache: loaded tokens [%d, %d) of %s in %.1f ms",
                    spec.load_from,
                    got,
                    spec.req_id,
                    (time.perf_counter() - t0) * 1e3,
                )
            if got < spec.load_until:
                first_bad = max(spec.load_from, got) // bs
                last = -(-spec.load_until // bs)
                bad = spec.block_ids[first_bad:last]
                logger.warning(
                    "lmcache: loaded %d of tokens [%d, %d) for %s; vLLM recomputes %d blocks",
                    max(0, got - spec.load_from),
                    spec.load_from,
                    spec.load_until,
                    spec.req_id,
                    len(bad),
                )
                self._failed_blocks.update(bad)
                self.recent.append(("failed", spec.req_id, bad, (got, spec.load_until)))

    def wait_for_save(self, meta: LMCacheConnectorMetadata) -> None:
        if self.engine is None:
            return
        for spec in meta.saves:
            self.engine.store(spec.prompt.prompt(), self.kv(spec.block_ids))
            self.recent.append(("save", spec.req_id, spec.block_ids, (0, spec.prompt.num_tokens)))

    def take_failed_blocks(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self in WORKERS:
            WORKERS.remove(self)


# ---------------------------------------------------------------------------- the connector


class LMCacheKVConnector(KVConnectorBase_V1):
    """vLLM's KV connector interface, delegating to the side of its role."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        tc = vllm_config.kv_transfer_config
        if tc.kv_load_failure_policy != "recompute":
            logger.info(
                "lmcache: kv_load_failure_policy=recompute (a cache miss must not fail a request)"
            )
            tc.kv_load_failure_policy = "recompute"
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = SchedulerSide(vllm_config, kv_cache_config)
        else:
            self.worker = WorkerSide(vllm_config, kv_cache_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future miss, never wrong output

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheConnectorMetadata)
        self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv, before the forward pass

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # chunks are stored whole in wait_for_save

    def wait_for_save(self) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheConnectorMetadata)
        self.worker.wait_for_save(meta)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed_blocks() if self.worker is not None else set()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.scheduler is not None:
            self.scheduler.close()

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        try:
            return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens), False
        except Exception:
            logger.exception("lmcache: lookup failed; treating it as a miss")
            return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        self.scheduler.request_finished(request)
        return False, None


#: The name the issue and LMCache users know; with ``kv_connector_module_path``
#: set to ``lmcache_vllm`` it loads this connector, not vLLM's built-in one.
LMCacheConnectorV1 = LMCacheKVConnector

__all__ = ["LMCacheConnectorV1", "LMCacheKVConnector", "LayoutKind"]


def _pinned_arena(config: Any) -> Any:
    """The DRAM tier's memory pinned for the CUDA kernels; None (pageable) if that fails."""
    from lmcache_core.pool import SLOT_OFFSET
    from lmcache_cuda.pinned import CudaUnavailableError, PinnedArena

    try:
        return PinnedArena(config.max_local_cpu_size + SLOT_OFFSET)
    except (CudaUnavailableError, OSError) as e:
        logger.warning("lmcache: DRAM tier not pinned (%s); GPU transfers use torch copies", e)
        return None
