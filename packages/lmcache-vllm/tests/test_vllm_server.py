"""vLLM's OpenAI server with lmcache, driven by ``lmcache bench serve`` (real server, real HTTP).

The server runs its worker in a separate process, so this also covers the
scheduler's lookups over the worker's Unix socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from lmcache_core.testing.servers import free_port  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    import tempfile

    from lmcache_vllm.testing import vllm_server

    tmp_path = tmp_path_factory.mktemp("vllm-server")
    metrics_port = free_port()
    sockets = tempfile.mkdtemp(prefix="lmc-")  # short: Unix socket paths are limited
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "512MiB",
        "LMCACHE_METRICS_PORT": str(metrics_port),
        "LMCACHE_SOCKET_DIR": str(tmp_path),
    }
    with vllm_server(tiny_model, "kv_both", env, tmp_path / "vllm.log") as port:
        yield port, metrics_port, Path(sockets)


def bench_serve(port: int, *args: str) -> dict:
    """Run ``lmcache bench serve --json`` against the server; its parsed summary."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmcache_core.cli",
            "bench",
            "serve",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_bench_serve_against_a_real_server_hits_the_cache(server):
    port, metrics_port, _sockets = server
    summary = bench_serve(
        port,
        "--docs",
        "2",
        "--doc-words",
        "500",
        "--passes",
        "2",
        "--metrics-url",
        f"http://127.0.0.1:{metrics_port}/metrics",
    )
    first, second = summary["passes"]
    assert first["errors"] == 0 and second["errors"] == 0
    assert first["mean_prompt_tokens"] > 500
    m = summary["lmcache"]
    # The second pass found both documents' full chunks. The worker runs in its own
    # process here, so these hits came through the lookup socket.
    assert m["lmcache:num_hit_tokens"] >= 2 * 512
    assert m["lmcache:num_retrieved_tokens"] >= 2 * 512
    assert m["lmcache:stored_bytes"] > 0


def test_multi_round_qa_runs_against_the_same_server(server):
    port, _metrics_port, _ = server
    rounds = bench_serve(
        port,
        "--workload",
        "multi-round-qa",
        "--users",
        "2",
        "--rounds",
        "2",
        "--system-words",
        "300",
        "--question-words",
        "20",
    )["passes"]
    assert [r["requests"] for r in rounds] == [2, 2]
    assert rounds[1]["mean_prompt_tokens"] > rounds[0]["mean_prompt_tokens"]
