"""MP mode in real vLLM servers: one ``lmcache server`` shared by every engine on the host.

Each test runs real processes: the lmcache server (``python -m lmcache_server``)
and vLLM's OpenAI server(s) with lmcache's connector in server mode
(``server_url``), or with upstream's documented ``LMCacheMPConnector`` pair.
Hits are read from vLLM's own counter of external cache hits, so what is
tested is what vLLM sees.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("vllm")
pytest.importorskip("lmcache_server")
pytestmark = pytest.mark.slow

from lmcache_core.bench.scrape import scrape_metrics  # noqa: E402
from lmcache_server.testing import ServerProcess, private_dir  # noqa: E402
from lmcache_vllm.testing import complete, vllm_process, vllm_server  # noqa: E402

CACHE = {"chunk_size": 256, "max_local_cpu_size": "256MiB"}
PROMPT = " ".join(f"shared{i} document words" for i in range(120))  # ~600 tokens


def vllm_env(**more: str) -> dict[str, str]:
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        **more,
    }


def external_hits(port: int) -> float:
    m = scrape_metrics(f"http://127.0.0.1:{port}/metrics", prefix="vllm:")
    return m.get("vllm:external_prefix_cache_hits", 0.0)


def test_upstream_mp_quick_start_runs_unchanged(tiny_model, tmp_path):
    """`lmcache server --port P` and vLLM with "kv_connector": "LMCacheMPConnector" only."""
    from lmcache_core.testing.servers import free_port

    sockets = private_dir()
    port = free_port()
    env = vllm_env(LMCACHE_SOCKET_DIR=sockets)
    with ServerProcess(
        {"max_local_cpu_size": "256MiB"},
        port=port,
        args=["--l1-size-gb", "0.25", "--eviction-policy", "LRU", "--chunk-size", "256"],
        env=env,
    ) as server:
        assert server.socket_path.startswith(sockets)
        extra = {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": port}
        with vllm_server(tiny_model, "kv_both", env, tmp_path / "vllm.log",
                         connector="LMCacheMPConnector", extra_config=extra) as v:  # fmt: skip
            first = complete(v, PROMPT, max_tokens=8)
            second = complete(v, PROMPT, max_tokens=8)  # vLLM's own prefix cache is off
            hits = external_hits(v)
            m = scrape_metrics(f"http://127.0.0.1:{v}/metrics", prefix="lmcache:")
    assert second == first
    assert hits >= 512
    assert m.get("lmcache:num_hit_tokens", 0) >= 512  # lmcache's metrics on vLLM's /metrics


def test_an_engine_killed_and_restarted_hits_what_it_stored(tiny_model, tmp_path):
    with ServerProcess(CACHE) as server:
        extra = {"server_url": server.url}
        with vllm_process(tiny_model, "kv_both", vllm_env(), tmp_path / "a.log",
                          extra_config=extra) as (port, proc):  # fmt: skip
            first = complete(port, PROMPT, max_tokens=8)
            os.killpg(proc.pid, signal.SIGKILL)  # a crash: no shutdown, no flush
            proc.wait(30)
        status = _server_status(server)  # the killed engine's leases and pins are gone
        assert all(s["leases"] == 0 for s in status["sessions"])
        assert status["pinned_chunks"] == 0 and status["chunks"] >= 2
        with vllm_server(tiny_model, "kv_both", vllm_env(), tmp_path / "a2.log",
                         extra_config=extra) as again:  # fmt: skip
            second = complete(again, PROMPT, max_tokens=8)
            hits = external_hits(again)
    assert second == first
    assert hits >= 512


def test_vllm_serves_through_a_server_crash_and_reconnects(tiny_model, tmp_path):
    server = ServerProcess(CACHE).start()
    try:
        extra = {"server_url": server.url}
        with vllm_server(tiny_model, "kv_both", vllm_env(), tmp_path / "v.log",
                         extra_config=extra) as port:  # fmt: skip
            first = complete(port, PROMPT, max_tokens=8)
            server.kill()
            # no failed request while the server is gone: misses, recomputed
            for _ in range(3):
                assert complete(port, PROMPT, max_tokens=8) == first
            before = external_hits(port)
            server.start()
            time.sleep(11)  # the reconnect backoff is at most 10 s
            complete(port, PROMPT, max_tokens=8)  # stores again into the new server
            assert complete(port, PROMPT, max_tokens=8) == first
            after = external_hits(port)
        assert after - before >= 512
        assert "lmcache server connection lost" in (tmp_path / "v.log").read_text()
    finally:
        server.stop()


def _server_status(server: ServerProcess) -> dict:
    """The server's status once no client holds a lease (or after 10 s)."""
    from lmcache_server.testing import client_engine

    engine = client_engine(server.url)
    try:
        deadline = time.monotonic() + 10
        while True:
            st = engine.chunk_store.status()
            if st is not None and all(s["leases"] == 0 for s in st["sessions"]):
                return st
            if time.monotonic() > deadline:
                return st or {}
            time.sleep(0.1)
    finally:
        engine.close()
