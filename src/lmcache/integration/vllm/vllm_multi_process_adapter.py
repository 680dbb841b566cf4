"""``lmcache.integration.vllm.vllm_multi_process_adapter``: the names vLLM's in-tree
``LMCacheMPConnector`` imports first.

vLLM 0.32 resolves ``"kv_connector": "LMCacheMPConnector"`` to
``lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector`` when that
module exists, which it does here: lmcache's own connector, talking to this
host's ``lmcache server`` (:mod:`lmcache.integration.vllm.lmcache_mp_connector`).
vLLM's module still imports the adapter names below at load time, so they are
defined, with upstream's fields for the two data classes.

The two adapter classes exist for vLLM's *built-in* fallback connector only
(``LMCACHE_USE_UPSTREAM_MP=1``), which drives upstream's server protocol: the
server copies KV out of the GPU through CUDA IPC. lmcache's server does not:
engines copy KV into its shared arena themselves, which is what makes a hit
cheaper than upstream's. So those classes refuse to start, saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ParallelStrategy:
    """Upstream's description of a worker's place in the parallel layout."""

    use_mla: bool
    kv_world_size: int
    kv_worker_id: int
    actual_world_size: int
    actual_worker_id: int
    tp_size: int
    pp_size: int


@dataclass
class LoadStoreOp:
    """Upstream's load or store of one request: its blocks and token range."""

    block_ids: list[int]
    token_ids: list[int] | None = None
    block_hashes: list[bytes] | None = None
    start: int = 0
    end: int = 0
    skip_first_n_tokens: int = 0

    def __len__(self) -> int:
        return len(self.block_ids)


_USE_OURS = (
    "lmcache's server is driven by lmcache's own LMCacheMPConnector, which vLLM picks for "
    '"kv_connector": "LMCacheMPConnector" unless LMCACHE_USE_UPSTREAM_MP is set: unset '
    "LMCACHE_USE_UPSTREAM_MP (vLLM's built-in fallback speaks upstream LMCache's protocol, "
    "in which the server copies KV out of the GPU over CUDA IPC)"
)


class LMCacheMPSchedulerAdapter:
    """Upstream's scheduler-side adapter: not used with lmcache's server (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(_USE_OURS)


class LMCacheMPWorkerAdapter:
    """Upstream's worker-side adapter: not used with lmcache's server (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(_USE_OURS)
