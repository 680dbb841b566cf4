"""``LMCacheMPConnector``: upstream LMCache's MP-mode connector name, on lmcache's server.

vLLM 0.32's in-tree ``LMCacheMPConnector`` looks for this module first and,
finding it, uses this class. So upstream's documented pair runs unchanged::

    lmcache server --l1-size-gb 100 --eviction-policy LRU
    vllm serve M --kv-transfer-config \\
        '{"kv_connector":"LMCacheMPConnector","kv_role":"kv_both"}'

It is lmcache-vllm's connector (:class:`~lmcache_vllm.connector.LMCacheKVConnector`:
the same lookups, loads, stores, metrics and events) with its chunks on the
host's ``lmcache server``. Upstream's ``kv_connector_extra_config`` keys:

* ``lmcache.mp.host`` (default ``tcp://localhost``) and ``lmcache.mp.port``
  (default 5555) name the server; a loopback host means the server's local
  socket for that port (no TCP, no secret); ``unix:///path.sock`` names a
  socket directly;
* the chunk size is the server's (its ``--chunk-size`` or config), as upstream's
  connector asks the server for it, unless ``chunk_size`` is set here;
* other ``lmcache.mp.*`` keys have no effect here and are reported.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from lmcache_vllm.connector import LMCacheKVConnector
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError(
        f"lmcache's vLLM connector is not installed ({e}); install it from this repository "
        "with: pip install './packages/lmcache-vllm' (or the meta-package with the [vllm] extra)"
    ) from e

from lmcache_core.mp.address import DEFAULT_PORT, parse_server_url
from lmcache_core.mp.connection import server_about

logger = logging.getLogger("vllm.lmcache")

#: Upstream's ``lmcache.mp.*`` keys that do nothing here, with why.
IGNORED_MP_KEYS = {
    "mq_timeout": "calls time out after server_timeout (5 s): a cache never holds a request",
    "heartbeat_interval": "a lost server is noticed on the next call and reconnected",
    "mp_transfer_mode": "the engine always copies through the server's shared arena",
    "nonblocking_lookup_status": "lookups are answered within the step",
    "isolated_ipc": "no CUDA IPC: the arena is shared memory the engine maps",
    "use_vmm_api": "no CUDA IPC: the arena is shared memory the engine maps",
    "server_urls": "one server per host serves every rank",
    "autostart": "start the server yourself (lmcache server), e.g. as a DaemonSet",
    "eager_prefetch": "loads are planned per request",
}


def mp_server_url(extra: dict[str, Any]) -> str:
    """The ``server_url`` that upstream's ``lmcache.mp.host`` / ``lmcache.mp.port`` name."""
    host = str(extra.get("lmcache.mp.host", "tcp://localhost")).strip()
    port = int(extra.get("lmcache.mp.port", DEFAULT_PORT))
    if host.startswith("unix://") or host.startswith("/"):
        return host
    if "://" not in host:
        host = f"tcp://{host}"
    return f"{host.rstrip('/')}:{port}"


def mp_extra_config(extra: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's ``kv_connector_extra_config`` of an ``LMCacheMPConnector``, as lmcache-vllm's
    connector reads it: the server's URL (and chunk size), upstream's MP keys removed."""
    extra = dict(extra or {})
    out = {k: v for k, v in extra.items() if not k.startswith("lmcache.mp.")}
    for key in extra:
        name = key.removeprefix("lmcache.mp.")
        if key.startswith("lmcache.mp.") and name not in ("host", "port"):
            why = IGNORED_MP_KEYS.get(name, "not an option of lmcache's server")
            logger.warning("lmcache: kv_connector_extra_config.%s does nothing here (%s)", key, why)
    url = out.get("server_url") or out.get("lmcache.server_url") or mp_server_url(extra)
    out["server_url"] = url
    out.pop("lmcache.server_url", None)
    if "chunk_size" not in out and "lmcache.chunk_size" not in out:
        try:
            about = server_about(parse_server_url(url), timeout=5.0)
            if isinstance(about.get("chunk_size"), int):
                out["chunk_size"] = about["chunk_size"]
        except (OSError, ValueError) as e:
            logger.warning(
                "lmcache: the server at %s is not reachable yet (%s); using the configured "
                "chunk size, and serving without the cache until the server is up",
                url,
                e,
            )
    return out


class LMCacheMPConnector(LMCacheKVConnector):
    """lmcache-vllm's connector with its chunks on the host's ``lmcache server``."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        tc = vllm_config.kv_transfer_config
        tc.kv_connector_extra_config = mp_extra_config(tc.kv_connector_extra_config)
        super().__init__(vllm_config, role, kv_cache_config)


__all__ = ["LMCacheMPConnector", "mp_extra_config", "mp_server_url"]
