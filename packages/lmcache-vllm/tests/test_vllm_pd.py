"""Disaggregated prefill: 1 prefill + 1 decode vLLM server behind lmcache_vllm.pd_router.

Real OpenAI servers on the CPU, the p2p tier over NIXL with a real Redis
index, and a plain single vLLM as the reference for the output.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("nixl")
pytestmark = pytest.mark.slow

from lmcache_core.bench.scrape import scrape_metrics  # noqa: E402
from lmcache_core.testing.scratch import scratch_dir  # noqa: E402
from lmcache_core.testing.servers import RedisServer, free_port  # noqa: E402
from lmcache_vllm.testing import complete, vllm_server, wait_http  # noqa: E402


def test_one_prefill_one_decode_answers_as_a_single_instance(peaked_model, tmp_path):
    rnd = random.Random(5)
    prompt = [rnd.randrange(2, 4000) for _ in range(700)]
    base_env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "512MiB",
    }
    with vllm_server(peaked_model, None, base_env, tmp_path / "single.log") as single:
        expected = complete(single, prompt)
    with RedisServer() as redis:
        p2p = {
            "LMCACHE_ENABLE_P2P": "true",
            "LMCACHE_P2P_INDEX_URL": redis.url,
            "LMCACHE_AUTH_SECRET": os.urandom(32).hex(),  # the p2p index requires one
        }
        prefill_env = {**base_env, **p2p, "LMCACHE_SOCKET_DIR": str(scratch_dir("p-"))}
        decode_metrics = free_port()
        decode_env = {
            **base_env,
            **p2p,
            "LMCACHE_SOCKET_DIR": str(scratch_dir("d-")),
            "LMCACHE_METRICS_PORT": str(decode_metrics),
        }
        with (
            vllm_server(peaked_model, "kv_producer", prefill_env, tmp_path / "p.log") as p_port,
            vllm_server(peaked_model, "kv_consumer", decode_env, tmp_path / "d.log") as d_port,
        ):
            router_port = free_port()
            router = subprocess.Popen(
                [sys.executable, "-m", "lmcache_vllm.pd_router",
                 "--prefill", f"http://127.0.0.1:{p_port}",
                 "--decode", f"http://127.0.0.1:{d_port}", "--port", str(router_port)],
            )  # fmt: skip
            try:
                wait_http(f"http://127.0.0.1:{router_port}/v1/models", router, tmp_path / "d.log")
                got = complete(router_port, prompt)
                m = scrape_metrics(f"http://127.0.0.1:{decode_metrics}/metrics")
            finally:
                router.terminate()
                router.wait(10)
    assert got == expected, "1P1D must answer exactly as one instance computing it"
    # 699 computable tokens: 5 whole 128-token blocks came from the prefill instance.
    assert m.get("lmcache:num_hit_tokens", 0) == 640
    assert m.get("lmcache:num_stored_tokens", 0) == 0, "a kv_consumer never stores"
