"""vLLM's OpenAI server with lmcache, driven by ``lmcache bench serve`` (real server, real HTTP).

The server runs its worker in a separate process, so this also covers the
scheduler's lookups over the worker's Unix socket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from lmcache_core.testing.servers import free_port  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("vllm-server")
    import tempfile

    port, metrics_port = free_port(), free_port()
    sockets = tempfile.mkdtemp(prefix="lmc-")  # short: Unix socket paths are limited
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "512MiB",
        "LMCACHE_METRICS_PORT": str(metrics_port),
        "LMCACHE_SOCKET_DIR": str(tmp_path),
    }
    log = open(tmp_path / "vllm.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_model),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--dtype",
            "bfloat16",
            "--enforce-eager",
            "--max-model-len",
            "4096",
            "--no-enable-prefix-caching",
            "--kv-transfer-config",
            json.dumps(
                {
                    "kv_connector": "LMCacheKVConnector",
                    "kv_connector_module_path": "lmcache_vllm",
                    "kv_role": "kv_both",
                }
            ),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "vLLM did not start"
                time.sleep(1)
        yield port, metrics_port, Path(sockets)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


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
