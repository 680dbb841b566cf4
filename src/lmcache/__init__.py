"""``lmcache``: the import name upstream LMCache's users and vLLM already know.

vLLM's built-in ``LMCacheConnectorV1`` (``--kv-transfer-config
'{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'``, no module
path) imports ``lmcache.integration.vllm.vllm_v1_adapter.LMCacheConnectorV1Impl``.
This package answers that import with lmcache-vllm, so upstream's quick start,
its ``LMCACHE_*`` variables and its YAML files work unchanged. Nothing else of
upstream's API is provided: this is a drop-in for the connector, not a fork.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lmcache")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__"]
