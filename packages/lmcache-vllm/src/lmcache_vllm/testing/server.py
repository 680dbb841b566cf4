"""A real vLLM OpenAI server with (or without) lmcache, for tests and benchmark tools.

As :mod:`lmcache_core.testing.servers` does for Redis and S3: one helper
that starts the server in its own process group, waits for ``/health``, and
always stops it. Nothing here imports vLLM; the server is a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from lmcache_core.testing.servers import free_port


def wait_http(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 600) -> None:
    """Wait until ``url`` answers; fail with the log's tail if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{url} did not come up in {timeout:.0f} s; log: {log}"
                ) from None
            time.sleep(1)


@contextmanager
def vllm_process(
    model: str | Path,
    role: str | None,
    env: Mapping[str, str],
    log: Path,
    dtype: str = "bfloat16",
    *,
    extra_config: Mapping[str, Any] | None = None,
    args: list[str] = (),  # type: ignore[assignment]
    connector: str = "LMCacheKVConnector",
    max_model_len: int = 4096,
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """vLLM's OpenAI server on a free port: yields (port, process); ``role`` None: no lmcache.

    The process leads its own process group (its workers are in it), so
    :func:`lmcache_core.bench.soak.group_rss` can measure all of them.

    ``extra_config`` goes into ``kv_connector_extra_config``; ``args`` are more
    server arguments. vLLM's prefix cache is off unless ``args`` turn it on.
    ``connector="LMCacheConnectorV1"`` uses vLLM's built-in name with no module
    path, as upstream LMCache's quick start does (answered by ``lmcache``'s shim);
    any other name but ``LMCacheKVConnector`` is one of vLLM's own connectors
    (``SimpleCPUOffloadConnector``, for comparisons).
    """
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--port", str(port), "--host", "127.0.0.1", "--dtype", dtype, "--enforce-eager",
        "--max-model-len", str(max_model_len), "--no-enable-prefix-caching", "--seed", "0", *args,
    ]  # fmt: skip
    if role is not None:
        kv = {"kv_connector": connector, "kv_role": role}
        if connector == "LMCacheKVConnector":  # others are vLLM's (or the lmcache shim's)
            kv["kv_connector_module_path"] = "lmcache_vllm"
        if extra_config:
            kv["kv_connector_extra_config"] = dict(extra_config)
        cmd += ["--kv-transfer-config", json.dumps(kv)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield port, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def vllm_server(
    model: str | Path,
    role: str | None,
    env: Mapping[str, str],
    log: Path,
    dtype: str = "bfloat16",
    *,
    extra_config: Mapping[str, Any] | None = None,
    args: list[str] = (),  # type: ignore[assignment]
    connector: str = "LMCacheKVConnector",
    max_model_len: int = 4096,
) -> Iterator[int]:
    """:func:`vllm_process`, yielding the port only."""
    with vllm_process(
        model, role, env, log, dtype, extra_config=extra_config, args=args,
        connector=connector, max_model_len=max_model_len,
    ) as (port, _):  # fmt: skip
        yield port


@contextmanager
def vllm_servers(*servers: Mapping[str, Any]) -> Iterator[list[int]]:
    """Several :func:`vllm_server` at once, each from its keyword arguments; yields their
    ports in order. Their start-ups overlap (mostly one Python thread each, so two start
    in about the time of one on two cores); all are stopped on the way out, and if one
    fails to start, the others are stopped too."""
    with ExitStack() as stack:
        with ThreadPoolExecutor(max(1, len(servers))) as pool:
            futures = [pool.submit(stack.enter_context, vllm_server(**kw)) for kw in servers]
            wait(futures)
        yield [f.result() for f in futures]


def complete(port: int, prompt: str | list[int], max_tokens: int = 16, **body: Any) -> str:
    """Greedy completion of ``prompt`` from the server on ``port``; its text.

    ``body`` adds fields to the request (``cache_salt``, ``kv_transfer_params``...).
    """
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())
    req_body = {
        "model": models["data"][0]["id"],
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        **body,
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        json.dumps(req_body).encode(),
        {"Content-Type": "application/json"},
    )
    return json.loads(urllib.request.urlopen(req, timeout=600).read())["choices"][0]["text"]
