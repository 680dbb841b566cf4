"""Upstream LMCache's quick start, unchanged, against these packages in a real vLLM server.

vLLM's documented flag names the built-in ``LMCacheConnectorV1`` with no
module path; vLLM then imports ``lmcache.integration.vllm.vllm_v1_adapter``,
which the ``lmcache`` meta-package answers with lmcache-vllm. The cache is
configured by upstream's quick-start variables only; the hits are read from
vLLM's own counters (``vllm:external_prefix_cache_hits``), since nothing of
lmcache's is set up beyond what upstream's users set.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

UPSTREAM_QUICK_START_ENV = {
    "LMCACHE_CHUNK_SIZE": "256",
    "LMCACHE_LOCAL_CPU": "True",
    "LMCACHE_MAX_LOCAL_CPU_SIZE": "5.0",  # GB, as upstream reads a bare number
}


def test_upstream_quick_start_runs_unchanged_and_hits(tiny_model, tmp_path):
    from lmcache_core.bench.scrape import scrape_metrics
    from lmcache_vllm.testing import complete, vllm_server

    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        **UPSTREAM_QUICK_START_ENV,
    }
    extra = {"lmcache.save_unfull_chunk": False, "lmcache_rpc_port": 5555}  # upstream keys
    with vllm_server(
        tiny_model,
        "kv_both",
        env,
        tmp_path / "vllm.log",
        connector="LMCacheConnectorV1",
        extra_config=extra,
    ) as port:
        prompt = " ".join(f"upstream{i}" for i in range(150))
        first = complete(port, prompt, max_tokens=8)
        second = complete(port, prompt, max_tokens=8)  # vLLM's prefix cache is off here
        m = scrape_metrics(f"http://127.0.0.1:{port}/metrics", prefix="vllm:")
    assert second == first
    assert m["vllm:external_prefix_cache_hits"] >= 512
    log = (tmp_path / "vllm.log").read_text()
    assert "lmcache.integration shim" in log
    assert "kv_connector_extra_config.lmcache_rpc_port has no effect here" in log


def _sibling(name: str):
    """A test module next to this one (tests import in importlib mode: not on sys.path)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_built_in_name_has_lmcaches_metrics_and_removal_events(tiny_model, tmp_path):
    """production-stack's ``LMCacheConnectorV1`` (no module path), as a new user runs it:
    vLLM's /metrics has every lmcache family (at zero before the first request), the same
    counts as lmcache's exporter after requests, and an evicted chunk is published as a
    ``BlockRemoved`` (the in-tree wrapper alone would publish it as a store)."""
    import json
    import time

    from lmcache_core.bench.scrape import scrape_metrics
    from lmcache_core.metrics import METRICS, ZERO_GAUGES
    from lmcache_core.testing.servers import free_port
    from lmcache_vllm.testing import complete, vllm_server

    Router = _sibling("test_vllm_kv_events").Router
    _families = _sibling("test_vllm_server")._families

    events_port, metrics_port = free_port(), free_port()
    events_cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{events_port}",
    }
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "LMCACHE_CHUNK_SIZE": "256",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "6MiB",  # twelve 512 KiB chunks: the 2nd prompt evicts
        "LMCACHE_METRICS_PORT": str(metrics_port),
        "LMCACHE_SOCKET_DIR": str(tmp_path),
    }
    args = ["--kv-events-config", json.dumps(events_cfg)]
    router = Router(f"tcp://127.0.0.1:{events_port}")
    try:
        with vllm_server(
            tiny_model, "kv_both", env, tmp_path / "vllm.log", connector="LMCacheConnectorV1",
            args=args,
        ) as port:  # fmt: skip
            vllm_url = f"http://127.0.0.1:{port}/metrics"
            exporter_url = f"http://127.0.0.1:{metrics_port}/metrics"
            fams = _families(vllm_url)
            zero = {n for n, s in METRICS.items() if s.kind != "gauge" or n in ZERO_GAUGES}
            with_series = {n for n, f in fams.items() if f.samples}
            assert zero <= with_series, f"no series before a request: {zero - with_series}"
            time.sleep(1)  # ZMQ's slow joiner
            first = " ".join(f"alpha{i}" for i in range(260))
            complete(port, first, max_tokens=2)
            complete(port, first, max_tokens=2)  # a hit from lmcache (prefix caching off)
            router.drain(3)
            cpu = [h for e in router.stored("CPU") for h in e.block_hashes]
            assert cpu and not router.removed("CPU")
            complete(port, " ".join(f"beta{i}" for i in range(300)), max_tokens=2)
            complete(port, "gamma " * 20, max_tokens=2)  # one more step carries the events
            router.drain(3)
            gone = router.removed("CPU")
            assert gone and gone <= set(cpu)
            # Counters and histogram counts equal to lmcache's own exporter's.
            compared = [n for n, s in METRICS.items() if s.kind == "counter"]
            compared += [f"{n}_count" for n, s in METRICS.items() if s.kind == "histogram"]
            deadline = time.monotonic() + 20
            while True:
                ours, theirs = scrape_metrics(exporter_url), scrape_metrics(vllm_url)
                if all(ours.get(n, 0) == theirs.get(n, 0) for n in compared):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert ours["lmcache:num_hit_tokens"] >= 256
            assert {n: theirs.get(n, 0) for n in compared} == {n: ours.get(n, 0) for n in compared}
    finally:
        router.close()
    log = (tmp_path / "vllm.log").read_text()
    assert "lmcache.integration shim" in log
    assert "LMCacheConnectorV1 has changed" not in log
