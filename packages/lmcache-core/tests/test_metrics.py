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
    m.observe("lmcache:time_to_retrieve", 0.5)  # before the first interval: carried too
    first = m.take_interval()
    assert first["counters"] == {"lmcache:num_hit_tokens": [[[], 5]]}
    # (vLLM's /metrics ran one observation behind the exporter when this was dropped)
    assert first["observations"] == {"lmcache:time_to_retrieve": [[[], [0.5]]]}
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


def test_every_family_has_a_zero_series_from_the_start_per_known_tier():
    """Dashboards read 0, not "No data": counters and histograms (and the gauges whose zero is
    true) exist once declared, per tier where labelled; an interval carries them once."""
    from lmcache_core.metrics import ZERO_GAUGES
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics()
    m.inc("lmcache:num_evictions", 3, tier="cpu")
    m.declare(tier=["cpu", "disk"])
    fams = {f.name: f for f in text_string_to_metric_families(render_prometheus(m))}
    expected = {n for n, s in METRICS.items() if s.kind != "gauge" or n in ZERO_GAUGES}
    assert expected <= set(fams), expected - set(fams)
    ev = {s.labels["tier"]: s.value for s in fams["lmcache:num_evictions"].samples}
    assert ev == {"cpu": 3, "disk": 0}  # a value already there is kept
    failures = {tuple(sorted(s.labels.items())) for s in fams["lmcache:num_failures"].samples}
    assert (("op", ""), ("tier", "disk")) in failures  # an unknown label is left empty
    count = [s for s in fams["lmcache:time_to_store"].samples if s.name.endswith("_count")]
    assert [s.value for s in count] == [0]
    assert "lmcache:tier_authenticated" not in fams  # only a shared tier knows its value
    first = m.take_interval()
    assert [[["disk"], 0], [["cpu"], 3]] == sorted(
        first["counters"]["lmcache:num_evictions"], key=lambda r: r[1]
    )
    assert first["observations"]["lmcache:time_to_store"] == [[[], []]]
    assert first["gauges"]["lmcache:pinned_chunks"] == [[["cpu"], 0], [["disk"], 0]]
    assert m.take_interval() == {"counters": {}, "gauges": {}, "observations": {}}
