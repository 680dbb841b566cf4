"""``LMCacheConnectorV1Impl``: what vLLM's built-in ``LMCacheConnectorV1`` delegates to.

vLLM's wrapper (``vllm/distributed/kv_transfer/kv_connector/v1/lmcache_connector.py``)
builds ``LMCacheConnectorV1Impl(vllm_config, role, parent)`` and forwards its
connector calls here, with a few signatures of its own (``update_state_after_alloc``
without blocks, ``get_num_new_matched_tokens`` returning an int, events through
``get_kv_events``). This class owns an
:class:`~lmcache_vllm.connector.LMCacheKVConnector` and adapts those calls to
it; the cache, its keys and its config are the same as with
``kv_connector_module_path: lmcache_vllm``.

What the wrapper does not forward (lmcache's metrics on vLLM's ``/metrics``,
``BlockRemoved`` events: the wrapper turns every event of ``get_kv_events`` into
``BlockStored``) lmcache-vllm's vLLM plugin adds to the wrapper class, delegating
to :attr:`connector` (:mod:`lmcache_vllm.builtin_name`). Should it find a wrapper
it does not know, ``get_kv_events`` below still returns stores only, so a removal
is never published as a store; then use ``"kv_connector": "LMCacheKVConnector",
"kv_connector_module_path": "lmcache_vllm"``, or ``metrics_port`` for lmcache's
exporter.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from lmcache_vllm.connector import LMCacheKVConnector
    from vllm.distributed.kv_events import BlockStored
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError(
        f"lmcache's vLLM connector is not installed ({e}); install it from this repository "
        "with: pip install './packages/lmcache-vllm' (or the meta-package with the [vllm] extra)"
    ) from e

logger = logging.getLogger("vllm.lmcache")


class LMCacheConnectorV1Impl:
    """lmcache-vllm's connector behind the interface vLLM's built-in wrapper calls."""

    def __init__(self, vllm_config: Any, role: Any, parent: Any) -> None:
        # The wrapper keeps the KV cache config the connector needs.
        self.connector = LMCacheKVConnector(vllm_config, role, parent._kv_cache_config)
        logger.info("lmcache: serving vLLM's LMCacheConnectorV1 (lmcache.integration shim)")

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.connector.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        self.connector.bind_connector_metadata(connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.connector.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.connector.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kw: Any) -> None:
        self.connector.save_kv_layer(layer_name, kv_layer, attn_metadata, **kw)

    def wait_for_save(self) -> None:
        self.connector.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.connector.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.connector.get_block_ids_with_load_errors()

    def get_kv_events(self) -> list[Any]:
        """Stored blocks since the last step (the wrapper makes every event a store)."""
        taken = self.connector.get_kv_connector_kv_cache_events()
        events = taken.get_all_events() if taken is not None else []
        return [e for e in events if isinstance(e, BlockStored)]

    def shutdown(self) -> None:
        self.connector.shutdown()

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        new, _async = self.connector.get_num_new_matched_tokens(request, num_computed_tokens)
        return new or 0

    def update_state_after_alloc(self, request: Any, num_external_tokens: int) -> None:
        self.connector.update_state_after_alloc(request, None, num_external_tokens)  # type: ignore[arg-type]

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        return self.connector.build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Any]:
        return self.connector.request_finished(request, block_ids)
