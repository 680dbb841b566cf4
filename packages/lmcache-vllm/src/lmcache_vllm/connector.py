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

Every scheduler-side hook is wrapped: an lmcache error in one (a request whose
controls lmcache cannot key, a bug) serves that request without the cache and
never reaches vLLM's scheduler, whose state would otherwise be left half
updated for every later request (:meth:`SchedulerSide.serve_uncached`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from lmcache_core.layout import LayoutKind
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from lmcache_vllm.kv_events import LMCacheKVEvents
from lmcache_vllm.metadata import LMCacheConnectorMetadata
from lmcache_vllm.scheduler_side import SCHEDULERS, SchedulerSide
from lmcache_vllm.stats import LMCachePromMetrics, LMCacheStats, interval_payload
from lmcache_vllm.worker_side import WORKERS, WorkerSide

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.lmcache")


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
        """With use_layerwise, layer ``layer_name``'s loads land before its attention."""
        if self.worker is not None:
            self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """With use_layerwise, this layer's part of the step's saves is copied out now."""
        if self.worker is not None:
            self.worker.save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheConnectorMetadata)
        self.worker.wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Commit saves whose copies finished; report finished requests whose blocks
        vLLM kept for them (async saves, see :mod:`lmcache_vllm.worker_side`)."""
        if self.worker is None:
            return None, None
        return self.worker.get_finished(finished_req_ids) or None, None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This rank's metric changes since the last step (vLLM sums the ranks)."""
        if self.worker is None or self.worker.engine is None:
            return None
        stats = LMCacheStats(data=interval_payload(self.worker.engine.metrics, self.worker.rank))
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return LMCacheStats(data=data) if data is not None else LMCacheStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        """lmcache's metrics on vLLM's ``/metrics`` (see :mod:`lmcache_vllm.stats`)."""
        return LMCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_kv_cache_events(self) -> LMCacheKVEvents | None:
        """This rank's stored/removed events since the last step (see :mod:`.kv_events`)."""
        if self.worker is None or self.worker.events is None:
            return None
        return self.worker.events.take()

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
        except Exception as e:
            self._failed(request, "get_num_new_matched_tokens", e)
            return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self.scheduler is not None
        try:
            self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)
        except Exception as e:  # a load vLLM expects is then sent as a failed one
            self._failed(request, "update_state_after_alloc", e)

    def _failed(self, request: Request, hook: str, error: BaseException) -> None:
        """An lmcache error in a scheduler hook: that request goes on without the cache."""
        try:
            assert self.scheduler is not None
            self.scheduler.serve_uncached(request.request_id, hook, error)
        except Exception:
            logger.exception("lmcache: %s failed, and so did serving the request uncached", hook)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[Any, int]:
        """vLLM's ``vllm:prompt_tokens_cached_by_source``: lmcache's hit split into host
        (DRAM), disk, p2p, and external_unspecified (Redis, S3, a shared filesystem)."""
        if num_external_tokens <= 0 or self.scheduler is None:
            return {}
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        names = {
            "host": CacheHitSource.HOST,
            "disk": CacheHitSource.DISK,
            "p2p": CacheHitSource.P2P,
            "remote": CacheHitSource.EXTERNAL_UNSPECIFIED,
        }
        try:
            split = self.scheduler.hit_sources(request, num_external_tokens)
        except Exception:
            logger.debug("lmcache: hit sources unknown", exc_info=True)
            split = {}
        if not split:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        out: dict[Any, int] = {}
        for kind, n in split.items():
            src = names.get(kind, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[src] = out.get(src, 0) + n
        return out

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Per request guarded inside (:meth:`SchedulerSide.build_connector_meta`); should
        the step itself fail, the workers get a fence and nothing else to do."""
        assert self.scheduler is not None
        try:
            return self.scheduler.build_connector_meta(scheduler_output)
        except Exception:
            logger.exception("lmcache: planning the step failed; nothing loaded or stored in it")
            return LMCacheConnectorMetadata(fence=True)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        events = connector_output.kv_cache_events
        if self.scheduler is not None and self.scheduler.events is not None and events:
            try:
                self.scheduler.events.add(events)
            except Exception:
                logger.warning("lmcache: KV cache events of this step dropped", exc_info=True)

    def reset_cache(self) -> bool | None:
        """vLLM resets its caches (``reset_prefix_cache(reset_connector=True)``, and
        ``pause_generation(clear_cache=True)`` around a weight update): lmcache must
        never load KV stored before (it was computed by other weights)."""
        if self.scheduler is None:
            return None
        try:
            return self.scheduler.reset_cache()
        except Exception:
            logger.exception("lmcache: cache reset failed")
            return False

    def take_events(self) -> Iterable[KVCacheEvent]:
        """Events every rank reported, for vLLM's event publisher."""
        if self.scheduler is None or self.scheduler.events is None:
            return ()
        try:
            return self.scheduler.events.take()
        except Exception:
            logger.warning("lmcache: KV cache events dropped", exc_info=True)
            return ()

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Whether vLLM keeps the request's blocks for saves in flight: answered first
        (:meth:`SchedulerSide.request_finished`), whatever the clean-up meets."""
        assert self.scheduler is not None
        try:
            return self.scheduler.request_finished(request), None
        except Exception:
            logger.exception("lmcache: forgetting request %s failed", request.request_id)
            return False, None


#: The name the issue and LMCache users know; with ``kv_connector_module_path``
#: set to ``lmcache_vllm`` it loads this connector, not vLLM's built-in one.
LMCacheConnectorV1 = LMCacheKVConnector

__all__ = [
    "SCHEDULERS",
    "WORKERS",
    "LMCacheConnectorV1",
    "LMCacheKVConnector",
    "LayoutKind",
    "SchedulerSide",
    "WorkerSide",
]
