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
