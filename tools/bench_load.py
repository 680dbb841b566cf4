"""Serving under load: vLLM alone vs vLLM with lmcache, many users, KV memory smaller than them.

The scenario of issue 16, in one run: vLLM with its prefix cache on (as
everyone runs it) and a KV cache that holds only part of the users' contexts
(``--kv-blocks``), ``--users`` users with documents of their own, ``--rounds``
rounds each, ``--concurrency`` requests in flight, measured by lmcache's load
generator (``lmcache_core.loadgen``) against

1. vLLM alone;
2. vLLM with lmcache, DRAM tier (large enough for everything);
3. vLLM with lmcache, a DRAM tier smaller than the working set with local disk below.

One server at a time (two would fight over the cores). Prints TTFT/ITL
percentiles, throughput and hit rates per configuration with ratios against
vLLM alone, and writes every run as JSON plus an SVG of TTFT over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_vllm import default_dtype
    from lmcache_core.bench_load import write_ttft_svg
    from lmcache_core.loadgen import LoadSpec, hit_rate, run_load, samples_json, summarize
    from lmcache_core.workload import scrape_metrics
    from lmcache_vllm.testing import vllm_server
    from make_test_model import ensure_model
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="default: the local random ~200M Llama (32 KiB KV/token)")
    ap.add_argument("--dtype", help="default: bfloat16 where the CPU has AVX512-BF16/AMX")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--context-words", type=int, default=2200, help="~2400 tokens")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument(
        "--kv-blocks", type=int, default=100, help="vLLM's KV blocks (128 tokens each on CPU)"
    )
    ap.add_argument("--dram", default="4GiB", help="lmcache DRAM tier, configuration 2")
    ap.add_argument("--small-dram", default="512MiB", help="DRAM tier over disk, configuration 3")
    ap.add_argument("--configs", default="vllm,lmcache,lmcache-disk")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()

    console = Console(width=160)
    model = args.model or str(
        ensure_model(ROOT / ".cache" / "models" / "llama-200m", preset="bench")
    )
    dtype = args.dtype or default_dtype()
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="lmcache-load-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = LoadSpec(
        users=args.users,
        rounds=args.rounds,
        context_words=args.context_words,
        question_words=20,
        answer_tokens=args.answer_tokens,
        concurrency=args.concurrency,
    )
    base_env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1" if os.cpu_count() == 2 else "all",
    }
    server_args = [
        "--enable-prefix-caching",
        "--num-gpu-blocks-override",
        str(args.kv_blocks),
        "--max-num-batched-tokens",
        "4096",
    ]
    configs = {
        "vllm": (None, {}),
        "lmcache": ("kv_both", {"LMCACHE_MAX_LOCAL_CPU_SIZE": args.dram}),
        "lmcache-disk": (
            "kv_both",
            {
                "LMCACHE_MAX_LOCAL_CPU_SIZE": args.small_dram,
                "LMCACHE_LOCAL_DISK": str(out_dir / "disk"),
                "LMCACHE_MAX_LOCAL_DISK_SIZE": "20GiB",
            },
        ),
    }
    results: dict[str, dict] = {}
    runs: dict[str, list] = {}
    for name in args.configs.split(","):
        role, env = configs[name]
        console.print(f"[bold]{name}[/]: starting vLLM ({model}, {dtype})")
        log = out_dir / f"{name}.log"
        with vllm_server(model, role, {**base_env, **env}, log, dtype, args=server_args) as port:
            url = f"http://127.0.0.1:{port}"
            before = scrape_metrics(f"{url}/metrics", prefix="")
            with console.status(f"{name}: {spec.users} users x {spec.rounds} rounds"):
                samples, wall, _ = asyncio.run(run_load(url, spec))
            summary = summarize(samples, wall)
            summary["hit_rate"] = hit_rate(before, scrape_metrics(f"{url}/metrics", prefix=""))
        results[name] = summary
        runs[name] = samples_json(samples)
        (out_dir / f"{name}.json").write_text(
            json.dumps({"label": name, "summary": summary, "samples": runs[name]})
        )
        console.print(f"{name}: {summary['request_throughput']:.3f} req/s, {wall:.0f} s")
    write_ttft_svg(out_dir / "ttft.svg", runs)

    base = results.get("vllm")
    table = Table(
        title=f"{spec.users} users x {spec.rounds} rounds, ~{args.context_words} words each, "
        f"concurrency {spec.concurrency}, {args.kv_blocks} KV blocks"
    )
    for col in (
        "config", "duration s", "req/s", "x vLLM", "TTFT p50", "TTFT p99", "ITL p50",
        "failed", "hit rates",
    ):  # fmt: skip
        table.add_column(col, justify="left" if col in ("config", "hit rates") else "right")
    for name, s in results.items():
        ratio = s["request_throughput"] / base["request_throughput"] if base else float("nan")
        rates = ", ".join(f"{k} {v:.0%}" for k, v in s["hit_rate"].items())
        table.add_row(
            name,
            f"{s['duration_s']:.0f}",
            f"{s['request_throughput']:.3f}",
            f"{ratio:.2f}",
            f"{s['ttft_s']['p50']:.2f}",
            f"{s['ttft_s']['p99']:.2f}",
            f"{s['itl_s']['p50'] * 1e3:.0f} ms",
            str(s["failed"]),
            rates,
        )
    console.print(table)
    (out_dir / "summary.json").write_text(json.dumps(results, indent=2))
    console.print(f"runs, logs and ttft.svg in {out_dir}")
    return 1 if any(s["failed"] for s in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
