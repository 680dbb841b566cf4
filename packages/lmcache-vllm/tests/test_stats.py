"""lmcache's connector stats as vLLM moves them: summed over ranks, recorded on vLLM's metrics."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from lmcache_core.metrics import Metrics
from lmcache_vllm.connector import LMCacheKVConnector
from lmcache_vllm.stats import LMCachePromMetrics, LMCacheStats, interval_payload
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def _rank(rank: int, hits: int, usage: int) -> LMCacheStats:
    m = Metrics()
    m.take_interval()
    m.inc("lmcache:num_hit_tokens", hits)
    m.set("lmcache:usage_bytes", usage, tier="cpu")
    m.observe("lmcache:time_to_retrieve", 0.01 * (rank + 1))
    return LMCacheStats(data=interval_payload(m, rank))


def test_ranks_are_summed_and_gauges_keep_their_rank():
    agg = _rank(0, 5, 100).aggregate(_rank(1, 7, 300))
    assert agg.data["counters"]["lmcache:num_hit_tokens"] == [[[], 12]]
    assert sorted(agg.data["gauges"]["lmcache:usage_bytes"]) == [
        [["cpu", "0"], 100],
        [["cpu", "1"], 300],
    ]
    assert agg.data["observations"]["lmcache:time_to_retrieve"] == [[[], [0.01, 0.02]]]
    assert agg.reduce()["num_hit_tokens"] == 12
    assert LMCacheStats().is_empty() and not agg.is_empty()
    # What vLLM's IPC hands the API server rebuilds the same object.
    again = LMCacheKVConnector.build_kv_connector_stats(agg.to_dict())
    assert again.data == agg.data


def test_prometheus_side_records_what_the_workers_sent():
    registry = CollectorRegistry()

    def bound(cls):
        class InRegistry(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **kw):
                super().__init__(*a, registry=registry, **kw)

        return InRegistry

    types = {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}
    prom = LMCachePromMetrics(_Cfg(), types, ["model_name", "engine"], {0: ["m", "0"]})
    stats = _rank(0, 5, 100).aggregate(_rank(1, 7, 300))
    prom.observe(stats.to_dict(), 0)
    prom.observe(_rank(0, 1, 50).to_dict(), 0)
    get = registry.get_sample_value
    assert get("lmcache:num_hit_tokens_total", {"model_name": "m", "engine": "0"}) == 13
    assert (
        get("lmcache:usage_bytes", {"model_name": "m", "engine": "0", "tier": "cpu", "rank": "0"})
        == 50
    )
    assert (
        get("lmcache:usage_bytes", {"model_name": "m", "engine": "0", "tier": "cpu", "rank": "1"})
        == 300
    )
    assert get("lmcache:time_to_retrieve_count", {"model_name": "m", "engine": "0"}) == 3


class _Cfg:
    kv_transfer_config = None


def test_vllms_metrics_have_every_family_at_zero_before_the_first_step(monkeypatch, tmp_path):
    """Before any request (no step has carried a payload), vLLM's /metrics has each family's
    zero series: per configured tier, gauges per rank (dashboards read 0, not "No data")."""
    from types import SimpleNamespace

    from lmcache_core.metrics import METRICS, ZERO_GAUGES

    monkeypatch.setenv("LMCACHE_LOCAL_DISK", f"file://{tmp_path}/")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_DISK_SIZE", "1GiB")
    registry = CollectorRegistry()

    def bound(cls):
        class InRegistry(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **kw):
                super().__init__(*a, registry=registry, **kw)

        return InRegistry

    cfg = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={}),
        parallel_config=SimpleNamespace(world_size=2),
    )
    types = {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}
    LMCachePromMetrics(cfg, types, ["model_name", "engine"], {0: ["m", "0"]})
    fams = {f.name: f for f in registry.collect()}
    expected = {n for n, s in METRICS.items() if s.kind != "gauge" or n in ZERO_GAUGES}
    present = {n for n, f in fams.items() if f.samples}
    assert expected <= present, expected - present
    get = registry.get_sample_value
    for tier in ("cpu", "disk"):
        assert (
            get("lmcache:stored_bytes_total", {"model_name": "m", "engine": "0", "tier": tier}) == 0
        )
        for rank in ("0", "1"):
            labels = {"model_name": "m", "engine": "0", "tier": tier, "rank": rank}
            assert get("lmcache:pinned_chunks", labels) == 0
    assert get("lmcache:time_to_lookup_count", {"model_name": "m", "engine": "0"}) == 0
