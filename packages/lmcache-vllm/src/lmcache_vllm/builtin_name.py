"""vLLM's built-in name ``LMCacheConnectorV1`` with lmcache's metrics and KV events.

production-stack's chart (and upstream's quick start) set ``"kv_connector":
"LMCacheConnectorV1"`` with no module path. vLLM then loads its in-tree wrapper
(``vllm/distributed/kv_transfer/kv_connector/v1/lmcache_connector.py``), which
builds ``lmcache.integration.vllm.vllm_v1_adapter.LMCacheConnectorV1Impl`` (the
``lmcache`` meta-package's shim around :class:`~lmcache_vllm.connector.LMCacheKVConnector`)
and forwards the connector calls to it, but not these:

* metrics: vLLM asks the *connector class* for ``build_kv_connector_stats`` and
  ``build_prom_metrics`` (in the API server, where no connector exists) and each
  worker's connector for ``get_kv_connector_stats``; the wrapper inherits the
  base class's, which report nothing, so ``/metrics`` has no ``lmcache:*`` series;
* KV events: the wrapper turns every event of ``get_kv_events()`` into a
  ``BlockStored`` (a removal would be published as a store) and does not gate
  them over tensor-parallel ranks.

:func:`install` (called by the ``vllm.general_plugins`` entry point, in every
vLLM process, before vLLM resolves the connector) gives the wrapper class those
methods, delegating to lmcache's connector:

* ``build_kv_connector_stats`` / ``build_prom_metrics`` (classmethods): lmcache's,
  when the shim this process would load is lmcache's and ``use_native`` is off;
  the wrapper's own otherwise;
* ``get_kv_connector_stats``, ``get_kv_connector_kv_cache_events``,
  ``update_connector_output``, ``take_events``, and the calls the wrapper does
  not forward at all (``reset_cache``: without it a weight update's cache reset
  left lmcache serving the old weights' KV; ``shutdown``,
  ``get_external_cache_hit_sources``, ``requires_kv_delivery``): lmcache's connector's, when the
  instance's ``_lmcache_engine`` is lmcache's shim; the wrapper's own otherwise
  (upstream LMCache installed instead, ``use_native``).

It is done only when the wrapper has the shape this was written against (the
methods it replaces are the ones of vLLM 0.32's wrapper, and nothing else
defines them); otherwise it logs why and leaves vLLM as it is: the built-in name
still serves the cache, without lmcache's metrics and removal events (use
``"kv_connector": "LMCacheKVConnector", "kv_connector_module_path": "lmcache_vllm"``,
or ``metrics_port`` for lmcache's own exporter). Installing twice is a no-op.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger("vllm.lmcache")

#: What the wrapper module and class are called in vLLM.
WRAPPER_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector"
WRAPPER_CLASS = "LMCacheConnectorV1"
#: The shim the wrapper builds (``lmcache`` meta-package).
SHIM_MODULE = "lmcache.integration.vllm.vllm_v1_adapter"
#: Instance methods the wrapper defines itself (replaced: they drop or mistype what
#: lmcache's connector reports) and those it inherits from the base class (added).
OWN = ("get_kv_connector_kv_cache_events", "update_connector_output", "take_events")
#: Without these the wrapper answers with the base class's no-ops: ``reset_cache``
#: above all (a weight update's cache reset would keep serving the old weights' KV),
#: ``shutdown`` (queued disk writes flushed), the hit sources, KV delivery.
INHERITED = (
    "get_kv_connector_stats",
    "reset_cache",
    "shutdown",
    "get_external_cache_hit_sources",
)
PROPERTIES = ("requires_kv_delivery",)
CLASSMETHODS = ("build_kv_connector_stats", "build_prom_metrics")
#: Set on the wrapper class once installed.
MARK = "_lmcache_vllm_delegates"
_said: list[str] = []


@functools.lru_cache(maxsize=1)
def _shim_is_ours() -> bool:
    """Whether the wrapper, in this process, builds lmcache's shim (not upstream LMCache's)."""
    try:
        import importlib

        shim = importlib.import_module(SHIM_MODULE)
    except Exception:
        return False
    from lmcache_vllm.connector import LMCacheKVConnector

    return getattr(shim, "LMCacheKVConnector", None) is LMCacheKVConnector


def _use_native(vllm_config: Any) -> bool:
    tc = getattr(vllm_config, "kv_transfer_config", None)
    extra = getattr(tc, "kv_connector_extra_config", None) or {}
    return bool(extra.get("use_native", False))


def _ours(wrapper: Any) -> Any:
    """lmcache's connector behind a wrapper instance, or None (another implementation)."""
    from lmcache_vllm.connector import LMCacheKVConnector

    connector = getattr(getattr(wrapper, "_lmcache_engine", None), "connector", None)
    return connector if isinstance(connector, LMCacheKVConnector) else None


def why_not(cls: Any) -> str | None:
    """Why the wrapper class cannot take the delegates (None: it can)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    if not isinstance(cls, type) or not issubclass(cls, KVConnectorBase_V1):
        return f"{WRAPPER_MODULE}.{WRAPPER_CLASS} is not a KVConnectorBase_V1"
    for name in OWN:
        if name not in cls.__dict__:
            return f"the wrapper no longer defines {name}"
    for name in (*INHERITED, *PROPERTIES, *CLASSMETHODS):
        if name in cls.__dict__:
            return f"the wrapper now defines {name} itself"
        if not hasattr(KVConnectorBase_V1, name):
            return f"vLLM's connector base class has no {name}"
    init = getattr(cls.__dict__.get("__init__"), "__code__", None)
    if init is None or "_lmcache_engine" not in init.co_names:
        return "the wrapper no longer keeps its implementation in _lmcache_engine"
    return None


def _instance_delegate(cls: Any, name: str) -> Any:
    original = getattr(cls, name)

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        connector = _ours(self)
        if connector is None:
            return original(self, *args, **kwargs)
        return getattr(connector, name)(*args, **kwargs)

    method.__doc__ = f"lmcache's ``{name}`` when the wrapper serves lmcache (see {__name__})."
    return method


def _property_delegate(cls: Any, name: str) -> property:
    original = getattr(cls, name)  # the base class's property

    def get(self: Any) -> Any:
        connector = _ours(self)
        return original.fget(self) if connector is None else getattr(connector, name)

    return property(get, doc=f"lmcache's ``{name}`` when the wrapper serves lmcache.")


def _classmethods(cls: Any) -> dict[str, Any]:
    from lmcache_vllm.connector import LMCacheKVConnector

    original_stats = cls.build_kv_connector_stats.__func__
    original_prom = cls.build_prom_metrics.__func__

    def build_kv_connector_stats(klass: Any, data: dict[str, Any] | None = None) -> Any:
        if _shim_is_ours() and (data is None or {"counters", "gauges"} <= set(data)):
            return LMCacheKVConnector.build_kv_connector_stats(data)
        return original_stats(klass, data)

    def build_prom_metrics(
        klass: Any,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:
        if _shim_is_ours() and not _use_native(vllm_config):
            return LMCacheKVConnector.build_prom_metrics(
                vllm_config, metric_types, labelnames, per_engine_labelvalues
            )
        return original_prom(klass, vllm_config, metric_types, labelnames, per_engine_labelvalues)

    return {
        "build_kv_connector_stats": classmethod(build_kv_connector_stats),
        "build_prom_metrics": classmethod(build_prom_metrics),
    }


def install() -> bool:
    """Give vLLM's ``LMCacheConnectorV1`` lmcache's metrics and events; True once done."""
    try:
        import importlib

        module = importlib.import_module(WRAPPER_MODULE)
        cls = getattr(module, WRAPPER_CLASS)
    except Exception as e:
        logger.info("lmcache: vLLM's built-in LMCacheConnectorV1 not found (%s); left alone", e)
        return False
    if getattr(cls, MARK, False):
        return True
    # Whose shim the wrapper builds is asked when it matters (upstream LMCache installed
    # instead, or use_native: every delegate falls back to the wrapper's own method).
    problem = why_not(cls)
    if problem is not None:
        if _said:
            return False
        _said.append(problem)  # once per process (vLLM runs its plugins many times)
        logger.warning(
            "lmcache: vLLM's built-in LMCacheConnectorV1 has changed (%s): with that name, "
            "vLLM's /metrics has no lmcache:* series and only stored-block KV events are "
            "sent. Use kv_connector LMCacheKVConnector with kv_connector_module_path "
            "lmcache_vllm for both, or metrics_port for lmcache's exporter",
            problem,
        )
        return False
    for name in (*OWN, *INHERITED):
        setattr(cls, name, _instance_delegate(cls, name))
    for name in PROPERTIES:
        setattr(cls, name, _property_delegate(cls, name))
    for name, value in _classmethods(cls).items():
        setattr(cls, name, value)
    setattr(cls, MARK, True)
    logger.debug("lmcache: vLLM's LMCacheConnectorV1 reports lmcache's metrics and events")
    return True
