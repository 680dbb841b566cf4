"""MP mode against in-process mode and vLLM alone: hit and uncached TTFT, paired.

The library code of ``tools/bench_server.py``. Every configuration is a real
vLLM OpenAI server, all alive at once, and each document goes to each of them
in turn (the order rotates), so every ratio compares requests seconds apart
and the machine's drift cancels:

* ``vllm``: vLLM alone, its own prefix cache on (its default): the uncached
  baseline, and the hit everyone compares against;
* ``inproc``: lmcache in the engine's process (vLLM's prefix cache off, so the
  hit is lmcache's);
* ``server``: lmcache on the host's ``lmcache server`` (``server_url``);
* ``server2`` (``two_engines``): a second vLLM on the same server, which sends
  the hit for documents ``server`` stored (no p2p tier: the same DRAM).

Per document: a new prompt (random token ids) to every side (uncached TTFT),
then the same prompt again (hit TTFT).
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lmcache_core.bench.client import BenchmarkFailed, OpenAIClient
from lmcache_core.bench.paired import spread
from lmcache_core.bench.scrape import scrape_metrics

from lmcache_vllm.testing import vllm_server

VOCAB = 4096  # the test model's; ids below it are valid for any larger vocabulary


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_CPU_OMP_THREADS_BIND": "0-1" if os.cpu_count() == 2 else "all",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": os.environ.get("LMCACHE_MAX_LOCAL_CPU_SIZE", "2GiB"),
    }


def prompt(seed: int, num_tokens: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, VOCAB) for _ in range(num_tokens)]


def _time_to_store(metrics_port: int) -> float:
    """The worker's own exporter (vLLM's /metrics gets histograms a step late)."""
    m = scrape_metrics(f"http://127.0.0.1:{metrics_port}/metrics", prefix="lmcache:")
    return m.get("lmcache:time_to_store_sum", 0.0)


def _phase(
    sides: list[str],
    model: str,
    dtype: str,
    server_url: str,
    prompt_tokens: int,
    seeds: list[int],
    logs: Path,
    settle_s: float,
    cold_on: dict[str, str],
    on_doc: Callable[[], None] | None,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """The sides alive together for one phase; per side, the uncached and hit TTFTs of
    every document and the time its stores took (lmcache sides). ``cold_on[s]``: the
    side whose uncached request stored the document ``s`` hits (itself by default)."""
    kw: dict[str, dict[str, Any]] = {
        "vllm": {"role": None, "args": ["--enable-prefix-caching"]},
        "inproc": {"role": "kv_both", "extra_config": {}},
        "server": {"role": "kv_both", "extra_config": {"server_url": server_url}},
        "server2": {"role": "kv_both", "extra_config": {"server_url": server_url}},
    }
    from lmcache_core.testing.servers import free_port

    metrics_port = {s: free_port() for s in sides if kw[s]["role"] is not None}
    for side, mport in metrics_port.items():
        kw[side]["extra_config"] = {**kw[side]["extra_config"], "metrics_port": mport}
    with ExitStack() as stack:
        clients: dict[str, OpenAIClient] = {}
        for side in sides:
            port = stack.enter_context(
                vllm_server(
                    model, kw[side]["role"], _env(), logs / f"{'-'.join(sides)}-{side}.log",
                    dtype, extra_config=kw[side].get("extra_config"), max_model_len=8192,
                    args=[*kw[side].get("args", []), "--max-num-batched-tokens", "8192"],
                )
            )  # fmt: skip
            clients[side] = OpenAIClient(f"http://127.0.0.1:{port}")

        def ttft(side: str, seed: int) -> float:
            time.sleep(settle_s)  # vLLM's workers poll for a while after a request
            r = clients[side].complete(prompt(seed, prompt_tokens), max_tokens=1, check=True)
            return r.ttft_s

        cold_sides = [s for s in sides if cold_on.get(s, s) == s]
        for side in cold_sides:  # warm-up: thread pools, first stores, page faults
            ttft(side, 99_000 + seeds[0])
        for side in sides:
            ttft(side, 99_000 + seeds[0])
        cold: dict[str, list[float]] = {s: [] for s in cold_sides}
        hit: dict[str, list[float]] = {s: [] for s in sides}
        store: dict[str, list[float]] = {s: [] for s in cold_sides if s != "vllm"}
        for i, seed in enumerate(seeds):
            k = i % len(cold_sides)
            order = cold_sides[k:] + cold_sides[:k]
            for side in order:
                before = _time_to_store(metrics_port[side]) if side in store else 0.0
                cold[side].append(ttft(side, seed))
                if side in store:
                    store[side].append(_time_to_store(metrics_port[side]) - before)
            for side in order + [s for s in sides if s not in cold_sides]:
                hit[side].append(ttft(side, seed))
            if on_doc is not None:
                on_doc()
    return cold, hit, store


def measure(
    model: str,
    dtype: str,
    server_url: str,
    *,
    prompt_tokens: int = 4000,
    docs: int = 6,
    two_engines: bool = True,
    logs: Path | None = None,
    settle_s: float = 1.2,
    on_doc: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Paired TTFTs in phases of two servers alive at once (idle vLLM CPU servers still
    take cycles from the one computing, so more at once slows every figure):

    1. ``inproc`` and ``server``: the hit through the server against the in-process hit;
    2. ``vllm`` (alone, its prefix cache) and ``server``: uncached cost, hit against
       vLLM's own;
    3. ``server`` and ``server2`` (``two_engines``): a second engine's hit on what the
       first stored, against the first's own hit.
    """
    logs = logs or Path(tempfile.mkdtemp(prefix="lmcache-mp-"))
    seeds = list(range(1, docs + 1))
    c1, h1, s1 = _phase(["inproc", "server"], model, dtype, server_url, prompt_tokens, seeds,
                        logs, settle_s, {}, on_doc)  # fmt: skip
    seeds2 = [1000 + s for s in seeds]
    c2, h2, s2 = _phase(["vllm", "server"], model, dtype, server_url, prompt_tokens, seeds2,
                        logs, settle_s, {}, on_doc)  # fmt: skip
    out: dict[str, Any] = {
        "model": str(model),
        "dtype": dtype,
        "prompt_tokens": prompt_tokens,
        "docs": docs,
        "phases": {
            "inproc+server": {"uncached": c1, "hit": h1, "store_s": s1},
            "vllm+server": {"uncached": c2, "hit": h2, "store_s": s2},
        },
        "paired": {
            "hit server / inproc": _ratios(h1, "server", "inproc"),
            "uncached server / inproc": _ratios(c1, "server", "inproc"),
            "hit server / vllm prefix cache": _ratios(h2, "server", "vllm"),
            "uncached server / vllm alone": _ratios(c2, "server", "vllm"),
        },
        "store_share_of_uncached": {
            "server": statistics.median(s / c for s, c in zip(s2["server"], c2["server"])),
            "inproc": statistics.median(s / c for s, c in zip(s1["inproc"], c1["inproc"])),
        },
        "logs": str(logs),
    }
    if two_engines:
        seeds3 = [2000 + s for s in seeds]
        c3, h3, _ = _phase(["server", "server2"], model, dtype, server_url, prompt_tokens,
                           seeds3, logs, settle_s, {"server2": "server"}, on_doc)  # fmt: skip
        out["phases"]["server+server2"] = {"uncached": c3, "hit": h3}
        out["paired"]["hit on a 2nd engine / the storing engine's hit"] = _ratios(
            h3, "server2", "server"
        )
    for phase in out["phases"].values():
        if min(statistics.median(v) for v in phase["hit"].values()) <= 0:
            raise BenchmarkFailed("a median TTFT of 0: the server answered without computing")
    return out


def _ratios(a: dict[str, list[float]], x: str, y: str) -> dict[str, float]:
    return spread([p / q for p, q in zip(a[x], a[y])]).as_dict()


def restart_hit_rate(
    model: str,
    dtype: str,
    server_url: str,
    *,
    prompt_tokens: int = 4000,
    docs: int = 4,
    logs: Path | None = None,
) -> dict[str, Any]:
    """The hit rate of a repeated workload before and after the engine is killed (-9)
    and started again on the same server: vLLM's own counters of external hits over
    the prompt tokens it asked about."""
    import os
    import signal

    from lmcache_vllm.testing import vllm_process

    logs = logs or Path(tempfile.mkdtemp(prefix="lmcache-mp-"))
    extra = {"server_url": server_url}

    def counters(client: OpenAIClient) -> tuple[float, float]:
        m = scrape_metrics(f"{client.base_url}/metrics", prefix="vllm:")
        return (
            m.get("vllm:external_prefix_cache_hits", 0.0),
            m.get("vllm:external_prefix_cache_queries", 0.0),
        )

    def run(client: OpenAIClient) -> float:
        h0, q0 = counters(client)
        for seed in range(1, docs + 1):
            client.complete(prompt(5000 + seed, prompt_tokens), max_tokens=1, check=True)
        h1, q1 = counters(client)
        return (h1 - h0) / (q1 - q0) if q1 > q0 else float("nan")

    with vllm_process(model, "kv_both", _env(), logs / "restart-1.log", dtype,
                      extra_config=extra, max_model_len=8192) as (port, proc):  # fmt: skip
        client = OpenAIClient(f"http://127.0.0.1:{port}")
        first = run(client)  # stores
        before = run(client)  # hits
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: nothing flushed, nothing closed
        proc.wait(60)
    with vllm_server(model, "kv_both", _env(), logs / "restart-2.log", dtype,
                     extra_config=extra, max_model_len=8192) as port2:  # fmt: skip
        after = run(OpenAIClient(f"http://127.0.0.1:{port2}"))
    return {"first_pass": first, "before_restart": before, "after_restart": after}
