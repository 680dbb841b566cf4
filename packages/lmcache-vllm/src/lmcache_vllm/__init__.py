"""lmcache-vllm: vLLM's v1 KV connector backed by lmcache-core.

Use it with ``"kv_connector": "LMCacheKVConnector", "kv_connector_module_path":
"lmcache_vllm"`` in ``--kv-transfer-config``. The connector is imported
lazily, so ``import lmcache_vllm`` stays cheap where vLLM is not installed.
"""

from typing import Any

from lmcache_vllm.version import __version__

__all__ = ["LMCacheConnectorV1", "LMCacheKVConnector", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("LMCacheKVConnector", "LMCacheConnectorV1"):
        from lmcache_vllm.compat import check_vllm

        check_vllm()  # an older vLLM is refused here, with what to install
        from lmcache_vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'lmcache_vllm' has no attribute {name!r}")
