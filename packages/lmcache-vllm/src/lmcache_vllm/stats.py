"""lmcache's metrics on vLLM's own ``/metrics``, through vLLM's connector metrics API.

Each worker's :class:`~lmcache_core.metrics.Metrics` gives what changed since
the last step (:meth:`~lmcache_core.metrics.Metrics.take_interval`); vLLM
carries that payload (plain lists and dicts, so it survives vLLM's IPC) from
every rank to the scheduler, sums the ranks with :meth:`LMCacheStats.aggregate`
and hands it, in the API server process, to :class:`LMCachePromMetrics`, which
records it into ``prometheus_client`` metrics created with vLLM's metric
classes and labels (``model_name``, ``engine``). No extra port, nothing to
scrape but vLLM.

Counters are summed over ranks (a cluster-wide hit count is what a dashboard
wants); gauges, which describe one rank's tiers, carry a ``rank`` label.

Every family has its zero series from the start (:func:`lmcache_core.metrics.zero_series`),
before the first request: per tier for the tiers the config makes, per rank for
gauges; a series the workers report later joins them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lmcache_core.metrics import METRICS, Metrics, zero_series
from prometheus_client import Counter, Gauge, Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

_KINDS = ("counters", "gauges", "observations")


def interval_payload(metrics: Metrics, rank: int) -> dict[str, Any]:
    """One worker's changes since its last step; gauges gain the worker's rank."""
    data = metrics.take_interval()
    data["gauges"] = {
        name: [[[*lv, str(rank)], v] for lv, v in rows] for name, rows in data["gauges"].items()
    }
    return data


@dataclass
class LMCacheStats(KVConnectorStats):
    """The connector stats payload: ``{"counters"|"gauges"|"observations": {name: rows}}``."""

    def __post_init__(self) -> None:
        if not all(k in self.data for k in _KINDS):
            self.reset()

    def reset(self) -> None:
        self.data = {k: {} for k in _KINDS}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not isinstance(other, LMCacheStats) or other.is_empty():
            return self
        for kind in _KINDS:
            mine: dict[str, list[list[Any]]] = self.data[kind]
            for name, rows in other.data[kind].items():
                merged = {tuple(lv): v for lv, v in mine.get(name, [])}
                for lv, v in rows:
                    key = tuple(lv)
                    if kind == "counters":
                        merged[key] = merged.get(key, 0) + v
                    elif kind == "gauges":
                        merged[key] = v
                    else:
                        merged[key] = [*merged.get(key, []), *v]
                mine[name] = [[list(k), v] for k, v in merged.items()]
        return self

    def reduce(self) -> dict[str, int | float]:
        """A summary for vLLM's periodic log line: counters summed, mean latencies in ms."""
        out: dict[str, int | float] = {}
        for name, rows in self.data["counters"].items():
            out[name.split(":", 1)[1]] = sum(v for _, v in rows)
        for name, rows in self.data["observations"].items():
            values = [x for _, obs in rows for x in obs]
            if values:
                out[f"{name.split(':', 1)[1]}_mean_ms"] = round(1e3 * sum(values) / len(values), 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in _KINDS)


class LMCachePromMetrics(KVConnectorPromMetrics):
    """Every metric of :data:`lmcache_core.metrics.METRICS`, on vLLM's registry."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, Any] = {}
        for name, spec in METRICS.items():
            labels = [*labelnames, *spec.labels]
            if spec.kind == "counter":
                metric = self._counter_cls(name=name, documentation=spec.help, labelnames=labels)
            elif spec.kind == "gauge":
                metric = self._gauge_cls(
                    name=name,
                    documentation=spec.help,
                    labelnames=[*labels, "rank"],
                    multiprocess_mode="mostrecent",
                )
            else:
                metric = self._histogram_cls(
                    name=name, documentation=spec.help, labelnames=labels, buckets=spec.buckets
                )
            self._metrics[name] = metric
        self._children: dict[tuple[int, str, tuple[str, ...]], Any] = {}
        tiers = expected_tiers(vllm_config)
        ranks = [str(r) for r in range(_world_size(vllm_config))]
        for engine_idx in per_engine_labelvalues:
            for name, spec, lv in zero_series(tier=tiers):
                if spec.kind == "gauge":
                    for rank in ranks:
                        self._child(engine_idx, name, [*lv, rank])
                else:
                    self._child(engine_idx, name, list(lv))

    def _child(self, engine_idx: int, name: str, lv: list[str]) -> Any:
        key = (engine_idx, name, tuple(lv))
        child = self._children.get(key)
        if child is None:
            values = [*self.per_engine_labelvalues[engine_idx], *lv]
            child = self._children[key] = self._metrics[name].labels(*values)
        return child

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, rows in transfer_stats_data.get("counters", {}).items():
            if name in self._metrics:
                for lv, v in rows:
                    self._child(engine_idx, name, lv).inc(v)
        for name, rows in transfer_stats_data.get("gauges", {}).items():
            if name in self._metrics:
                for lv, v in rows:
                    self._child(engine_idx, name, lv).set(v)
        for name, rows in transfer_stats_data.get("observations", {}).items():
            if name in self._metrics:
                for lv, values in rows:
                    child = self._child(engine_idx, name, lv)
                    for x in values:
                        child.observe(x)


def _world_size(vllm_config: Any) -> int:
    try:
        return max(1, int(vllm_config.parallel_config.world_size))
    except Exception:
        return 1


def expected_tiers(vllm_config: Any) -> list[str]:
    """The tier names the workers' engines will have (the API server builds none), from the
    same config they load; ``[]`` if it cannot be read here (the workers say why)."""
    from lmcache_core.tier_cascade import configured_tier_names

    from lmcache_vllm.settings import load_cache_config

    tc = getattr(vllm_config, "kv_transfer_config", None)
    extra = dict(getattr(tc, "kv_connector_extra_config", None) or {})
    quiet = [logging.getLogger(n) for n in ("vllm.lmcache", "lmcache_core")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:  # the workers log the config's warnings; not twice
            lg.setLevel(logging.ERROR + 1)
        return configured_tier_names(load_cache_config(extra))
    except Exception:
        return []
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


#: vLLM passes its own metric classes (Ray wraps them); these are the defaults.
DEFAULT_METRIC_TYPES = {Gauge: Gauge, Counter: Counter, Histogram: Histogram}
