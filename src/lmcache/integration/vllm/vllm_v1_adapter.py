"""``LMCacheConnectorV1Impl``: what vLLM's built-in ``LMCacheConnectorV1`` delegates to.

vLLM's wrapper (``vllm/distributed/kv_transfer/kv_connector/v1/lmcache_connector.py``)
builds ``LMCacheConnectorV1Impl(vllm_config, role, parent)`` and forwards its
connector calls here, with a few signatures of its own (``update_state_after_alloc``
without blocks, ``get_num_new_matched_tokens`` returning an int, events through
``get_kv_events``). This class adapts them to lmcache-vllm's
:class:`~lmcache_vllm.connector.LMCacheKVConnector` sides; the cache, its
keys and its config are the same as with ``kv_connector_module_path: lmcache_vllm``.

What the wrapper does not forward is not available this way: lmcache's
metrics on vLLM's ``/metrics`` (use ``"kv_connector": "LMCacheKVConnector",
"kv_connector_module_path": "lmcache_vllm"`` for those, or ``metrics_port``
for lmcache's exporter) and ``BlockRemoved`` events (the wrapper turns every
event into ``BlockStored``, so only stores are reported).
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from lmcache_vllm.metadata import LMCacheConnectorMetadata
    from lmcache_vllm.scheduler_side import SchedulerSide
    from lmcache_vllm.worker_side import WorkerSide
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError(
        f"lmcache's vLLM connector is not installed ({e}); install it from this repository "
        "with: pip install './packages/lmcache-vllm' (or the meta-package with the [vllm] extra)"
    ) from e

logger = logging.getLogger("vllm.lmcache")


class LMCacheConnectorV1Impl:
    """lmcache-vllm behind the interface vLLM's built-in LMCache connector calls."""

    def __init__(self, vllm_config: Any, role: Any, parent: Any) -> None:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        tc = vllm_config.kv_transfer_config
        if tc.kv_load_failure_policy != "recompute":
            tc.kv_load_failure_policy = "recompute"  # a cache miss must not fail a request
        kv_cache_config = getattr(parent, "_kv_cache_config", None)
        self.parent = parent
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self._meta: LMCacheConnectorMetadata | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = SchedulerSide(vllm_config, kv_cache_config)
        else:
            self.worker = WorkerSide(vllm_config, kv_cache_config)
        logger.info("lmcache: serving vLLM's LMCacheConnectorV1 (lmcache.integration shim)")

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        self._meta = connector_metadata

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self.worker is not None and self._meta is not None
        self.worker.start_load_kv(self._meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kw: Any) -> None:
        return  # chunks are stored whole in wait_for_save

    def wait_for_save(self) -> None:
        assert self.worker is not None and self._meta is not None
        self.worker.wait_for_save(self._meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed_blocks() if self.worker is not None else set()

    def get_kv_events(self) -> list[Any]:
        """Stored blocks since the last step (the wrapper can only publish stores)."""
        if self.worker is None or self.worker.events is None:
            return []
        taken = self.worker.events.take()
        events = taken.get_all_events() if taken is not None else []
        return [e for e in events if type(e).__name__ == "BlockStored"]

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.scheduler is not None:
            self.scheduler.close()

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        assert self.scheduler is not None
        try:
            return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        except Exception:
            logger.exception("lmcache: lookup failed; treating it as a miss")
            return 0

    def update_state_after_alloc(self, request: Any, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, None, num_external_tokens)  # type: ignore[arg-type]

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Any]:
        assert self.scheduler is not None
        self.scheduler.request_finished(request)
        return False, None
