"""lmcache's counters, gauges and histograms, with LMCache's Prometheus names (``lmcache:*``).

Every metric is declared once, in :data:`METRICS`, with its kind and its
label names, so every way out shows the same series:

* :class:`MetricsCollector` hands them to ``prometheus_client`` (exact values,
  counters with the ``_total`` suffix, histograms with buckets);
  :func:`serve_metrics` is the standalone exporter (SGLang, non-vLLM use);
* :meth:`Metrics.take_interval` gives what changed since the last call, for an
  engine that carries metrics itself (vLLM's connector stats put them on
  vLLM's own ``/metrics``, from every rank, with no extra port).

Names follow upstream LMCache where the meaning matches: ``num_hit_tokens``
counts tokens *retrieved* from the cache (upstream's meaning), lookups count
theirs in ``num_lookup_hits``; ``time_to_retrieve``/``time_to_store`` are
upstream's histograms.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

#: Latency buckets (seconds): 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: Relative K deviation of a blend (0: the cached KV is what this prompt computes).
DEVIATION_BUCKETS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1)
#: Shares (0..1).
FRACTION_BUCKETS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.9, 1)


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


def _counter(help: str, *labels: str) -> MetricSpec:
    return MetricSpec("counter", help, labels)


def _gauge(help: str, *labels: str) -> MetricSpec:
    return MetricSpec("gauge", help, labels)


def _latency(help: str) -> MetricSpec:
    return MetricSpec("histogram", help, (), LATENCY_BUCKETS)


T = "tier"
METRICS: dict[str, MetricSpec] = {
    "lmcache:num_lookup_requests": _counter("Lookups asked of the cache"),
    "lmcache:num_lookup_tokens": _counter("Prompt tokens looked up"),
    "lmcache:num_lookup_hits": _counter("Tokens found by lookups (longest cached prefix)"),
    "lmcache:num_store_requests": _counter("Store calls"),
    "lmcache:num_stored_tokens": _counter("Tokens newly stored"),
    "lmcache:num_retrieve_requests": _counter("Retrieve calls"),
    "lmcache:num_requested_tokens": _counter("Tokens retrieve calls asked for"),
    "lmcache:num_hit_tokens": _counter("Tokens retrieved: written back into the engine"),
    "lmcache:num_partial_chunk_loads": _counter(
        "Loads whose last chunk was the first blocks of a longer stored chunk"
    ),
    "lmcache:stored_bytes": _counter("Bytes written into a tier", T),
    "lmcache:retrieved_bytes": _counter("Bytes read from a tier", T),
    "lmcache:num_evictions": _counter("Chunks evicted from a tier", T),
    "lmcache:num_store_skipped_full": _counter("Chunks not stored: no evictable memory", T),
    "lmcache:num_failures": _counter("Operations that failed and became misses", T, "op"),
    "lmcache:num_expired_pins": _counter("Pins dropped because their owner left them", T),
    "lmcache:num_corrupt_chunks": _counter("Chunks whose checksum failed on read (dropped)", T),
    "lmcache:num_forged_chunks": _counter(
        "Values on a shared tier without a valid tag under this deployment's secret (dropped)", T
    ),
    "lmcache:num_foreign_chunks": _counter(
        "Frames on a shared tier sealed under a secret this instance does not hold (another "
        "deployment's, or a rotation's): misses, left in place",
        T,
    ),
    "lmcache:num_unencrypted_chunks": _counter(
        "Clear frames refused by a reader that requires encryption (remote_encryption): misses",
        T,
    ),
    "lmcache:num_stale_chunks": _counter(
        "Chunks a peer had reused the slot of by the time they were pulled (misses)", T
    ),
    "lmcache:num_dropped_writes": _counter(
        "Chunks not written to a lower tier: its write-behind queue was full or the tier down", T
    ),
    "lmcache:num_skipped_unhealthy": _counter("Operations skipped: the tier is unhealthy", T, "op"),
    "lmcache:num_promotions": _counter("Chunks copied up into the CPU tier on a lower hit", T),
    "lmcache:num_demotions": _counter("Chunks written down to a lower tier when evicted", T),
    "lmcache:blend_requests": _counter("Requests blended (segments reused at new positions)"),
    "lmcache:blend_reused_tokens": _counter(
        "Tokens whose cached KV a blend kept (re-rotated to their new positions)"
    ),
    "lmcache:blend_recomputed_tokens": _counter(
        "Tokens of a blend range recomputed in every layer (selected, or not cached)"
    ),
    "lmcache:blend_fallbacks": _counter(
        "Blends recomputed in full: the deviation left exceeded blend_max_deviation"
    ),
    "lmcache:blend_deviation": MetricSpec(
        "histogram",
        "Per blend: the cached tokens' K deviation at the check layer, relative to K's energy",
        (),
        DEVIATION_BUCKETS,
    ),
    "lmcache:blend_residual_deviation": MetricSpec(
        "histogram",
        "Per blend: the K deviation left in the tokens it reused (what the guard caps)",
        (),
        DEVIATION_BUCKETS,
    ),
    "lmcache:blend_recomputed_fraction": MetricSpec(
        "histogram",
        "Per blend: the share of its range recomputed in every layer",
        (),
        FRACTION_BUCKETS,
    ),
    "lmcache:server_sessions": _gauge("Clients connected to an lmcache server"),
    "lmcache:server_bad_requests": _counter(
        "Requests an lmcache server refused as malformed or not allowed (the client got an error)"
    ),
    "lmcache:server_auth_failures": _counter(
        "Clients or admin requests an lmcache server refused for a missing or wrong secret"
    ),
    "lmcache:server_leased_chunks": _counter("Chunks an lmcache server lent to clients' loads"),
    "lmcache:server_quota_skips": _counter(
        "Stores an lmcache server skipped: the tenant's quota could not hold them"
    ),
    "lmcache:tier_authenticated": _gauge(
        "1 when a shared tier authenticates what it reads, 0 when it runs without a secret", T
    ),
    "lmcache:tier_healthy": _gauge("1 while a tier answers, 0 while it is skipped", T, "path"),
    "lmcache:write_queue_bytes": _gauge("Bytes waiting in a tier's write-behind queue", T),
    "lmcache:usage_bytes": _gauge("Bytes stored in a tier", T),
    "lmcache:pinned_chunks": _gauge(
        "Chunks pinned between a lookup and its load (0 whenever no request is in flight)", T
    ),
    "lmcache:capacity_bytes": _gauge("Capacity of a tier", T),
    "lmcache:time_to_lookup": _latency("Seconds a lookup took"),
    "lmcache:time_to_retrieve": _latency("Seconds a retrieve took (tiers to engine memory)"),
    "lmcache:time_to_store": _latency("Seconds a store took (engine memory to the first tier)"),
}

LabelValues = tuple[str, ...]
#: Gauges whose zero is true until something sets them (the others are set when their
#: tier starts, or, as ``tier_authenticated``, exist only for a shared tier).
ZERO_GAUGES = frozenset(
    {
        "lmcache:server_sessions",
        "lmcache:pinned_chunks",
        "lmcache:write_queue_bytes",
        "lmcache:usage_bytes",
    }
)


def zero_series(**known: Sequence[str]) -> Iterator[tuple[str, MetricSpec, LabelValues]]:
    """The series every dashboard should find from the start, at zero: each counter, each
    histogram and each :data:`ZERO_GAUGES` gauge, once per combination of the ``known``
    label values (``tier=["cpu", "disk"]``). A label with no known values is left empty,
    which Prometheus reads as absent (``lmcache:num_failures_total{tier="disk"}``)."""
    for name, spec in METRICS.items():
        if spec.kind == "gauge" and name not in ZERO_GAUGES:
            continue
        for lv in itertools.product(*[list(known.get(label) or [""]) for label in spec.labels]):
            yield name, spec, tuple(str(v) for v in lv)


#: At most this many observations per histogram series wait for ``take_interval``.
MAX_PENDING_OBSERVATIONS = 4096


class _Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self, nbuckets: int) -> None:
        self.counts = [0] * (nbuckets + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0


class Metrics:
    """A thread-safe registry of the metrics in :data:`METRICS`.

    A label a metric does not declare is an error (a typo would otherwise
    start a new series); a declared label left out is the empty string.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[LabelValues, float]] = {}
        self._hists: dict[str, dict[LabelValues, _Histogram]] = {}
        # For take_interval: counters as last taken, observations since.
        self._taken: dict[str, dict[LabelValues, float]] = {}
        # Kept from the start (bounded): an observation made before the first
        # take_interval (the first request's lookup) must reach vLLM's /metrics too.
        self._pending: dict[str, dict[LabelValues, list[float]]] = {}

    @staticmethod
    def _key(name: str, labels: dict[str, str], kind: str | None = None) -> LabelValues:
        spec = METRICS.get(name)
        if spec is None:
            raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        if kind is not None and spec.kind != kind:
            raise TypeError(f"{name} is a {spec.kind}, not a {kind}")
        unknown = set(labels) - set(spec.labels)
        if unknown:
            raise KeyError(f"{name} has labels {spec.labels}, not {sorted(unknown)}")
        return tuple(str(labels.get(label, "")) for label in spec.labels)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = self._key(name, labels, "counter")
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        key = self._key(name, labels, "gauge")
        with self._lock:
            self._values.setdefault(name, {})[key] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = self._key(name, labels, "histogram")
        buckets = METRICS[name].buckets
        with self._lock:
            h = self._hists.setdefault(name, {}).get(key)
            if h is None:
                h = self._hists[name][key] = _Histogram(len(buckets))
            h.counts[bisect.bisect_left(buckets, value)] += 1
            h.sum += value
            h.count += 1
            pending = self._pending.setdefault(name, {}).setdefault(key, [])
            if len(pending) < MAX_PENDING_OBSERVATIONS:
                pending.append(value)

    def declare(self, **known: Sequence[str]) -> None:
        """Give every family its zero series now (see :func:`zero_series`), so a dashboard
        reads 0, not "No data", before the first event. Existing values are kept."""
        with self._lock:
            for name, spec, lv in zero_series(**known):
                if spec.kind == "histogram":
                    hists = self._hists.setdefault(name, {})
                    if lv not in hists:
                        hists[lv] = _Histogram(len(spec.buckets))
                        self._pending.setdefault(name, {}).setdefault(lv, [])
                else:
                    self._values.setdefault(name, {}).setdefault(lv, 0)

    @contextmanager
    def timer(self, name: str, **labels: str) -> Iterator[None]:
        """Observe the seconds the ``with`` body takes (also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe(name, time.perf_counter() - t0, **labels)

    def get(self, name: str, **labels: str) -> float:
        """The sum over the series of ``name`` whose labels include ``labels``.

        For a histogram, the number of observations.
        """
        self._key(name, labels)
        spec = METRICS[name]
        want = [(spec.labels.index(k), str(v)) for k, v in labels.items()]
        with self._lock:
            if spec.kind == "histogram":
                series = {k: float(h.count) for k, h in self._hists.get(name, {}).items()}
            else:
                series = self._values.get(name, {})
            return sum(v for k, v in series.items() if all(k[i] == w for i, w in want))

    def samples(self) -> Iterator[tuple[str, MetricSpec, dict[LabelValues, Any]]]:
        """Each metric with data: ``(name, spec, {label values: value or histogram})``.

        A histogram's value is ``(bucket counts, sum, count)``, the counts not
        cumulative, the last one for +Inf.
        """
        with self._lock:
            values = {k: dict(v) for k, v in self._values.items()}
            hists = {
                k: {lv: (list(h.counts), h.sum, h.count) for lv, h in v.items()}
                for k, v in self._hists.items()
            }
        for name, spec in METRICS.items():
            data = hists.get(name) if spec.kind == "histogram" else values.get(name)
            if data:
                yield name, spec, data

    def render_prometheus(self) -> str:
        """The Prometheus text exposition of these metrics."""
        return render_prometheus(self)

    def take_interval(self) -> dict[str, Any]:
        """What changed since the last call, as plain data (lists, dicts, strings).

        ``{"counters": {name: [[label values, increase], ...]},
        "gauges": {name: [[label values, value], ...]}`` (those set to a new value),
        "observations": {name: [[label values, [seconds, ...]], ...]}}``.
        Observations are kept from the start (at most :data:`MAX_PENDING_OBSERVATIONS`
        per series and interval). A series seen for the first time is in it even at zero
        (a declared counter with no increase, a histogram with no observation), so the
        receiver shows it from then on.
        """
        out: dict[str, Any] = {"counters": {}, "gauges": {}, "observations": {}}
        with self._lock:
            for name, series in self._values.items():
                kind = METRICS[name].kind
                taken = self._taken.setdefault(name, {})
                if kind == "gauge":
                    rows = [[list(k), v] for k, v in series.items() if taken.get(k) != v]
                else:
                    rows = [
                        [list(k), v - taken.get(k, 0)]
                        for k, v in series.items()
                        if v != taken.get(k, 0) or k not in taken
                    ]
                if rows:
                    out["gauges" if kind == "gauge" else "counters"][name] = rows
                taken.update(series)
            for name, pending in self._pending.items():
                rows = [[list(k), obs] for k, obs in pending.items()]
                if rows:
                    out["observations"][name] = rows
            self._pending = {}
        return out


class MetricsCollector:
    """A ``prometheus_client`` collector over a :class:`Metrics` (register it in a registry)."""

    def __init__(self, metrics: Metrics, extra_labels: dict[str, str] | None = None) -> None:
        self.metrics = metrics
        self.extra = dict(extra_labels or {})

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        extra_names = list(self.extra)
        extra_values = list(self.extra.values())
        for name, spec, data in self.metrics.samples():
            labels = [*extra_names, *spec.labels]
            if spec.kind == "counter":
                fam: Any = CounterMetricFamily(name, spec.help, labels=labels)
                for lv, v in sorted(data.items()):
                    fam.add_metric([*extra_values, *lv], v)
            elif spec.kind == "gauge":
                fam = GaugeMetricFamily(name, spec.help, labels=labels)
                for lv, v in sorted(data.items()):
                    fam.add_metric([*extra_values, *lv], v)
            else:
                fam = HistogramMetricFamily(name, spec.help, labels=labels)
                for lv, (counts, total, _n) in sorted(data.items()):
                    cumulative, acc = [], 0
                    for bound, c in zip([*spec.buckets, float("inf")], counts):
                        acc += c
                        cumulative.append((_bound(bound), acc))
                    fam.add_metric([*extra_values, *lv], cumulative, total)
            yield fam


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(b))


def registry_for(metrics: Metrics, extra_labels: dict[str, str] | None = None) -> Any:
    """A fresh ``prometheus_client`` registry holding only ``metrics``."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(metrics, extra_labels))  # type: ignore[arg-type]
    return registry


def render_prometheus(metrics: Metrics) -> str:
    """The Prometheus text exposition of ``metrics`` (by ``prometheus_client``)."""
    from prometheus_client import generate_latest

    return generate_latest(registry_for(metrics)).decode()


def serve_metrics(
    metrics: Metrics,
    port: int,
    host: str = "0.0.0.0",
    extra_labels: dict[str, str] | None = None,
) -> Any:
    """The standalone exporter: ``GET /metrics`` from a daemon thread.

    For SGLang and non-vLLM use (in vLLM the metrics are on vLLM's own
    ``/metrics``). Binds ``host`` (all interfaces by default, as Prometheus
    exporters do, so a Prometheus outside the pod can scrape it; config key
    ``metrics_host``). Returns the server: ``server.server_address`` has the
    bound port (port 0 picks a free one); ``server.shutdown()`` stops it.
    """
    from prometheus_client import ProcessCollector, start_http_server

    registry = registry_for(metrics, extra_labels)
    # As every Prometheus exporter does: this process's resident memory, CPU time
    # and open files (process_*), so a leak shows next to the cache's own figures.
    ProcessCollector(registry=registry)
    server, _thread = start_http_server(port, host, registry)
    return server


def start_exporter(metrics: Metrics, port: int | None, host: str, rank: int) -> Any:
    """The standalone exporter of one rank on ``port + rank``; None if off or the port is taken.

    A port that cannot be bound is logged with what to change, never an
    engine that fails to start: metrics are not worth a failed deployment.
    """
    if port is None:
        return None
    try:
        return serve_metrics(metrics, port + rank, host, extra_labels={"rank": str(rank)})
    except OSError as e:
        logging.getLogger(__name__).error(
            "lmcache: metrics exporter not started on %s:%d (%s); set metrics_port to a free "
            "port (each rank uses metrics_port + rank) or metrics_host to a local address",
            host,
            port + rank,
            e,
        )
        return None
