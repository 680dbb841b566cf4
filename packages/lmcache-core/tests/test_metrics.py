"""The metrics registry: declared labels, exact exposition, per-interval changes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lmcache_core.metrics import LATENCY_BUCKETS, METRICS, Metrics, render_prometheus


def test_a_label_a_metric_does_not_declare_is_an_error():
    m = Metrics()
    with pytest.raises(KeyError, match="labels"):
        m.inc("lmcache:num_hit_tokens", 1, tier="cpu")
    with pytest.raises(KeyError, match="unknown metric"):
        m.inc("lmcache:num_hits", 1)
    with pytest.raises(TypeError, match="gauge"):
        m.inc("lmcache:usage_bytes", 1, tier="cpu")


def test_every_metric_has_help_and_histograms_have_sorted_buckets():
    for name, spec in METRICS.items():
        assert name.startswith("lmcache:") and spec.help
        if spec.kind == "histogram":
            assert list(spec.buckets) == sorted(spec.buckets)
    assert LATENCY_BUCKETS[0] < 0.001 < 10 <= LATENCY_BUCKETS[-1]


def test_large_counts_are_exact_in_the_exposition():
    m = Metrics()
    m.inc("lmcache:stored_bytes", 134217729, tier="cpu")
    text = render_prometheus(m)
    line = next(x for x in text.splitlines() if x.startswith("lmcache:stored_bytes_total"))
    assert float(line.split()[-1]) == 134217729


def test_interval_gives_increases_changed_gauges_and_new_observations():
    m = Metrics()
    m.inc("lmcache:num_hit_tokens", 5)
    m.observe("lmcache:time_to_retrieve", 0.5)  # before the first interval: not pending
    first = m.take_interval()
    assert first["counters"] == {"lmcache:num_hit_tokens": [[[], 5]]}
    assert first["observations"] == {}
    m.inc("lmcache:num_hit_tokens", 2)
    m.set("lmcache:usage_bytes", 10, tier="cpu")
    m.observe("lmcache:time_to_retrieve", 0.25)
    second = m.take_interval()
    assert second["counters"] == {"lmcache:num_hit_tokens": [[[], 2]]}
    assert second["gauges"] == {"lmcache:usage_bytes": [[["cpu"], 10]]}
    assert second["observations"] == {"lmcache:time_to_retrieve": [[[], [0.25]]]}
    m.set("lmcache:usage_bytes", 10, tier="cpu")  # unchanged: not sent again
    assert m.take_interval() == {"counters": {}, "gauges": {}, "observations": {}}
    assert m.get("lmcache:time_to_retrieve") == 2


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=40))
def test_histogram_buckets_are_cumulative_and_count_every_observation(values):
    m = Metrics()
    for v in values:
        m.observe("lmcache:time_to_store", v)
    if not values:
        assert "time_to_store" not in render_prometheus(m)
        return
    text = render_prometheus(m).splitlines()
    buckets = [x for x in text if x.startswith("lmcache:time_to_store_bucket")]
    counts = [float(x.split()[-1]) for x in buckets]
    assert counts == sorted(counts) and counts[-1] == len(values)
    for bound, count in zip(LATENCY_BUCKETS, counts):
        assert count == sum(1 for v in values if v <= bound)
    total = next(x for x in text if x.startswith("lmcache:time_to_store_sum"))
    assert math.isclose(float(total.split()[-1]), sum(values), rel_tol=1e-9, abs_tol=1e-12)
