"""Counters and gauges, exposed with LMCache's Prometheus names (``lmcache:*``).

No dependency: the text exposition format is written here, so a Prometheus
server or ``curl`` can scrape it from whatever HTTP endpoint the adapter
serves. Every metric carries a ``tier`` label where it has one.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

#: name -> (type, help)
METRICS: dict[str, tuple[str, str]] = {
    "lmcache:num_lookup_requests": ("counter", "Lookups asked of the cache"),
    "lmcache:num_lookup_tokens": ("counter", "Prompt tokens looked up"),
    "lmcache:num_hit_tokens": ("counter", "Tokens found by lookups (longest cached prefix)"),
    "lmcache:num_store_requests": ("counter", "Store calls"),
    "lmcache:num_stored_tokens": ("counter", "Tokens newly stored"),
    "lmcache:num_retrieve_requests": ("counter", "Retrieve calls"),
    "lmcache:num_retrieved_tokens": ("counter", "Tokens written back to the engine"),
    "lmcache:stored_bytes": ("counter", "Bytes written into a tier"),
    "lmcache:retrieved_bytes": ("counter", "Bytes read from a tier"),
    "lmcache:num_evictions": ("counter", "Chunks evicted from a tier"),
    "lmcache:num_store_skipped_full": ("counter", "Chunks not stored: no evictable memory"),
    "lmcache:num_failures": ("counter", "Operations that failed and became misses"),
    "lmcache:num_expired_pins": ("counter", "Pins dropped because their owner left them behind"),
    "lmcache:num_corrupt_chunks": ("counter", "Chunks whose checksum failed on read (dropped)"),
    "lmcache:num_forged_chunks": (
        "counter",
        "Values on a shared tier without a valid tag under this deployment's secret (dropped)",
    ),
    "lmcache:tier_authenticated": (
        "gauge",
        "1 when a shared tier authenticates what it reads, 0 when it runs without a secret",
    ),
    "lmcache:num_stale_chunks": (
        "counter",
        "Chunks a peer had reused the slot of by the time they were pulled (misses)",
    ),
    "lmcache:num_dropped_writes": (
        "counter",
        "Chunks not written to a lower tier: its write-behind queue was full or the tier down",
    ),
    "lmcache:num_skipped_unhealthy": ("counter", "Operations skipped: the tier is unhealthy"),
    "lmcache:num_promotions": ("counter", "Chunks copied up into the CPU tier on a lower-tier hit"),
    "lmcache:num_demotions": ("counter", "Chunks written down to a lower tier when evicted"),
    "lmcache:blend_requests": ("counter", "Requests blended (segments reused at new positions)"),
    "lmcache:blend_reused_tokens": (
        "counter",
        "Tokens whose cached KV a blend kept (re-rotated to their new positions)",
    ),
    "lmcache:blend_recomputed_tokens": (
        "counter",
        "Tokens of a blend range recomputed in every layer (selected, or not cached)",
    ),
    "lmcache:tier_healthy": ("gauge", "1 while a tier answers, 0 while it is skipped"),
    "lmcache:write_queue_bytes": ("gauge", "Bytes waiting in a tier's write-behind queue"),
    "lmcache:usage_bytes": ("gauge", "Bytes stored in a tier"),
    "lmcache:capacity_bytes": ("gauge", "Capacity of a tier"),
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """A thread-safe registry of the metrics above."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)

    @staticmethod
    def _check(name: str) -> None:
        if name not in METRICS:
            raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._check(name)
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._check(name)
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = value

    def get(self, name: str, **labels: str) -> float:
        """The sum over the series of ``name`` whose labels include ``labels``."""
        self._check(name)
        want = set(labels.items())
        with self._lock:
            series = self._values.get(name, {})
            return sum(v for k, v in series.items() if want <= set(k))

    def snapshot(self) -> dict[str, dict[Labels, float]]:
        with self._lock:
            return {k: dict(v) for k, v in self._values.items()}

    def render_prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        snap = self.snapshot()
        for name, (kind, help_text) in METRICS.items():
            if name not in snap:
                continue
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(snap[name].items()):
                lbl = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{name}{{{lbl}}} {value:g}" if lbl else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def serve_metrics(metrics: Metrics, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``GET /metrics`` in the Prometheus text format from a daemon thread.

    Returns the server (``server.server_address`` has the bound port; port 0
    picks a free one). Binds to loopback unless ``host`` says otherwise.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = metrics.render_prometheus().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="lmcache-metrics", daemon=True).start()
    return server
