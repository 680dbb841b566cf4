"""A soak of vLLM with lmcache: many concurrent users for minutes, tiers under pressure.

One vLLM server (prefix cache on, as everyone runs it, with KV memory that
holds a fraction of the users' contexts) with lmcache's DRAM tier smaller
than the working set and a tier below it: local disk, or Redis (which the
soak kills and restarts in the middle). The load is
:mod:`lmcache_core.bench.loadgen`'s multi-round QA with ``duration_s``; the
checks are :func:`lmcache_core.bench.soak.problems`. ``tools/soak.py`` runs the
ten-minute version, ``tests/test_vllm_soak.py`` a two-minute one.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache_core.bench.loadgen import LoadSpec
from lmcache_core.bench.soak import Fault, SoakReport, problems, run_soak, value
from lmcache_core.testing.servers import RedisServer, free_port

from lmcache_vllm.testing.server import vllm_process

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(model: str | Path, dtype: str) -> int:
    """KV bytes one token takes in every layer, from the checkpoint's config.json."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * DTYPE_BYTES[dtype]


@dataclass
class SoakPlan:
    """What to run. Sizes are lmcache config strings (``"512MiB"``)."""

    model: str
    duration_s: float = 600.0
    users: int = 64
    concurrency: int = 64
    context_words: int = 250
    rounds: int = 3
    answer_tokens: int = 16
    dtype: str = "float32"
    #: vLLM's KV memory in blocks (128 tokens on the CPU); None: 1 GiB of them.
    vllm_kv_blocks: int | None = None
    dram: str = "512MiB"
    disk: str | None = "4GiB"  # None: no disk tier
    redis_fault: bool = False  # a Redis tier below DRAM, killed and restarted mid-run
    sample_every_s: float = 5.0
    max_rss_growth: float = 0.02
    baseline_rss_growth: float = 0.0  # the worker's growth without lmcache, same load
    lmcache: bool = True  # False: plain vLLM under the same load (the baseline)


def _engine_env() -> dict[str, str]:
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1" if os.cpu_count() == 2 else "all",
    }


def _engine_args(plan: SoakPlan) -> list[str]:
    """vLLM as everyone runs it (its prefix cache on), with the plan's KV memory."""
    args = ["--enable-prefix-caching"]
    if plan.vllm_kv_blocks:
        args += ["--num-gpu-blocks-override", str(plan.vllm_kv_blocks)]
    return args


def run_vllm_soak(plan: SoakPlan, workdir: Path) -> tuple[SoakReport, list[str], dict[str, Any]]:
    """Run ``plan``; returns (report, problems, facts about the run for a summary)."""
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_port = free_port() if plan.lmcache else None
    extra: dict[str, Any] = {
        "max_local_cpu_size": plan.dram,
        "metrics_port": metrics_port,
        "tier_retry_max_backoff": 5,
    }
    if plan.disk:
        extra |= {"local_disk": str(workdir / "disk"), "max_local_disk_size": plan.disk}
    env, args = _engine_env(), _engine_args(plan)
    faults: list[Fault] = []
    recovered_at = None
    with ExitStack() as stack:
        if plan.redis_fault and plan.lmcache:
            redis = stack.enter_context(RedisServer())
            extra["remote_url"] = redis.url
            env["LMCACHE_AUTH_SECRET"] = os.urandom(32).hex()  # a shared tier requires one
            down, up = 0.35 * plan.duration_s, 0.55 * plan.duration_s
            faults = [
                Fault(down, "redis killed", redis.kill),
                Fault(up, "redis restarted", redis.start),
            ]
            recovered_at = up
        port, proc = stack.enter_context(
            vllm_process(
                plan.model, "kv_both" if plan.lmcache else None, env, workdir / "vllm.log",
                plan.dtype,
                extra_config=extra, args=args,
            )
        )  # fmt: skip
        spec = LoadSpec(
            users=plan.users,
            rounds=plan.rounds,
            context_words=plan.context_words,
            answer_tokens=plan.answer_tokens,
            concurrency=plan.concurrency,
            duration_s=plan.duration_s,
        )
        report = run_soak(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None,
            spec,
            proc.pid,
            faults,
            every_s=plan.sample_every_s,
        )
    # The disk tier's chunks are of no use once the server is gone (gigabytes; the log stays).
    shutil.rmtree(workdir / "disk", ignore_errors=True)
    bpt = kv_bytes_per_token(plan.model, plan.dtype)
    if plan.lmcache:
        found = problems(
            report,
            kv_bytes_per_token=bpt,
            max_rss_growth=plan.max_rss_growth,
            baseline_rss_growth=plan.baseline_rss_growth,
            recovered_tier="redis" if plan.redis_fault else None,
            recovered_at_s=recovered_at,
        )
    else:  # the baseline: only that it served
        failed = report.summary["failed"]
        found = [f"{failed} requests to plain vLLM failed"] if failed else []
    facts = {
        "kv_bytes_per_token": bpt,
        # Each user's first prompt (its context) once: what all caches together would hold.
        "working_set_bytes": int(
            plan.users * report.summary["rounds"][0]["mean_prompt_tokens"] * bpt
        )
        if report.summary["rounds"]
        else 0,
        "log": str(workdir / "vllm.log"),
    }
    return report, found, facts


def run_mp_soak(
    plan: SoakPlan,
    workdir: Path,
    server_url: str,
    server_pid: int,
    server_metrics_url: str,
    *,
    engines: int = 2,
) -> tuple[list[SoakReport], list[str], dict[str, Any]]:
    """MP mode under load: ``engines`` vLLM servers on one ``lmcache server``, each with
    its share of the users, for ``plan.duration_s``. Checked: no request failed, the
    engines hit, the server's own resident memory is flat over the second half, and no
    chunk is left pinned on the server when the load has ended."""
    import statistics
    import threading
    import time
    import urllib.request

    from lmcache_core.bench.soak import process_memory, scrape_labeled, second_half_growth

    workdir.mkdir(parents=True, exist_ok=True)
    env, args = _engine_env(), _engine_args(plan)
    reports: list[SoakReport | None] = [None] * engines
    errors: list[BaseException] = []
    server_rss: list[tuple[float, float]] = []  # resident bytes, all of them
    server_anon: list[tuple[float, float]] = []  # its own heap (the arena is shared memory)
    with ExitStack() as stack:
        procs = [
            stack.enter_context(
                vllm_process(
                    plan.model, "kv_both", env, workdir / f"vllm-{i}.log", plan.dtype,
                    extra_config={"server_url": server_url, "metrics_port": free_port()},
                    args=args,
                )
            )
            for i in range(engines)
        ]  # fmt: skip
        t0 = time.monotonic()
        stop = threading.Event()

        def sample_server() -> None:
            while not stop.wait(plan.sample_every_s):
                m = process_memory(server_pid)
                if m:
                    t = time.monotonic() - t0
                    server_rss.append((t, float(m.get("rss", 0))))
                    server_anon.append((t, float(m.get("anon", 0))))

        def load(i: int) -> None:
            port, proc = procs[i]
            spec = LoadSpec(
                users=max(1, plan.users // engines), rounds=plan.rounds,
                context_words=plan.context_words, answer_tokens=plan.answer_tokens,
                concurrency=max(1, plan.concurrency // engines), duration_s=plan.duration_s,
                seed=1000 * i,
            )  # fmt: skip
            try:
                reports[i] = run_soak(f"http://127.0.0.1:{port}", None, spec, proc.pid,
                                      every_s=plan.sample_every_s)  # fmt: skip
            except BaseException as e:  # reported below
                errors.append(e)

        sampler = threading.Thread(target=sample_server, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=load, args=(i,)) for i in range(engines)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        # hits and stores, by vLLM's own counters of each engine
        hits = []
        name = "vllm:external_prefix_cache_hits_total"
        for port, _ in procs:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            lines = [ln for ln in body.splitlines() if ln.startswith(name)]
            hits.append(sum(float(ln.split()[-1]) for ln in lines))
    if errors:
        raise errors[0]
    done = [r for r in reports if r is not None]
    deadline = time.monotonic() + 30
    end = scrape_labeled(server_metrics_url)
    while value(end, "lmcache:pinned_chunks") and time.monotonic() < deadline:
        time.sleep(1)
        end = scrape_labeled(server_metrics_url)
    found: list[str] = []
    failed = sum(r.summary["failed"] for r in done)
    if failed:
        found.append(f"{failed} requests failed")
    if not all(h > 0 for h in hits):
        found.append(f"an engine never hit the server's cache (external hits: {hits})")
    growth = second_half_growth(server_rss, plan.duration_s)
    anon_growth = second_half_growth(server_anon, plan.duration_s)
    for what, g in (("resident memory", growth), ("own memory (RssAnon)", anon_growth)):
        if not g < plan.max_rss_growth:
            found.append(f"the server's {what} grew {g:.1%} over the second half")
    pinned = value(end, "lmcache:pinned_chunks")
    if pinned:
        found.append(f"{pinned:.0f} chunks still pinned on the server after the load")
    facts = {
        "engines": engines,
        "requests": sum(r.summary["requests"] for r in done),
        "failed": failed,
        "external_hit_tokens": hits,
        "server_rss_growth_second_half": growth,
        "server_anon_growth_second_half": anon_growth,
        "server_anon_median_bytes": statistics.median(v for _, v in server_anon)
        if server_anon
        else None,
        "server_rss_end_bytes": server_rss[-1][1] if server_rss else None,
        "server_rss_median_bytes": statistics.median(v for _, v in server_rss)
        if server_rss
        else None,
        "server_pinned_end": pinned,
    }
    return done, found, facts
