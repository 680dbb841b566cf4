"""Serving under load: vLLM alone vs vLLM with lmcache, many users, KV memory smaller than them.

The scenario of issue 16, in one run: vLLM with its prefix cache on (as
everyone runs it) and a KV cache that holds only part of the users' contexts
(``--kv-blocks``), ``--users`` users with documents of their own, ``--rounds``
rounds each, ``--concurrency`` requests in flight, measured by lmcache's load
generator (``lmcache_core.bench.loadgen``) against

1. vLLM alone;
2. vLLM with lmcache, DRAM tier (large enough for everything);
3. vLLM with lmcache, a DRAM tier smaller than the working set with local disk below;
4. (``--configs ...,vllm-offload``) vLLM with its own ``SimpleCPUOffloadConnector``
   and the same DRAM (``cpu_bytes_to_use``), the alternative a vLLM user has. It
   fails at start on vLLM's CPU backend; the failure is reported and the other
   configurations still run;
5. (``--configs ...,lmcache-chunks``) lmcache with hits inside a chunk off
   (``max_chunk_aliases: 0``): whole chunks only, as upstream LMCache loads.

One server at a time (two would fight over the cores). ``--rounds 4,8`` runs
the workload once per round count on each server (other users each time, so
one run does not warm the next). Prints TTFT/ITL percentiles, throughput and
hit rates per configuration with ratios against vLLM alone, and writes every
run as JSON plus an SVG of TTFT over time.

With lmcache, two single-request probes run on the same server
(``lmcache_core.bench.probes``; the server is started with
``VLLM_SERVER_DEV_MODE=1`` so vLLM's own prefix cache can be emptied before
each cached request): the *ideal* throughput (every first round a plain
prefill, every later round a hit at the single-request cached time, one
request after another), which the load run is reported against; and, on the
DRAM configuration, the TTFT of cached ~4000-token prompts sent
``--cached-concurrency`` at a time against one at a time (for vLLM alone the
same probe measures its own prefix cache: give it the KV blocks to hold the
prompts, e.g. ``--rounds 0 --kv-blocks 300`` runs the probes alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path

from lmcache_core.bench.client import failure_summary
from lmcache_core.bench.loadgen import LoadSpec, hit_rate, run_load, samples_json, summarize
from lmcache_core.bench.probes import cached_ttft_under_concurrency, ideal, single_request_times
from lmcache_core.bench.scrape import scrape_metrics
from lmcache_core.bench.serve import write_ttft_svg
from lmcache_vllm.bench.servers import server_configs, start
from lmcache_vllm.testing import tool_args, vllm_server
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    tool_args.add_arguments(ap, model="random")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--context-words", type=int, default=2200, help="~2400 tokens")
    ap.add_argument("--rounds", default="4", help="rounds per user; several: 4,8")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument(
        "--kv-blocks", type=int, default=100, help="vLLM's KV blocks (128 tokens each on CPU)"
    )
    ap.add_argument("--dram", default="4GiB", help="lmcache DRAM tier, configuration 2")
    ap.add_argument("--small-dram", default="512MiB", help="DRAM tier over disk, configuration 3")
    ap.add_argument("--configs", default="vllm,lmcache,lmcache-disk")
    ap.add_argument("--probes", type=int, default=2, help="users for the ideal; 0: none")
    ap.add_argument("--cached-concurrency", type=int, default=4, help="cached-TTFT probe; 0: none")
    ap.add_argument(
        "--cached-words", type=int, default=3400, help="~3900 tokens (the model takes 4096)"
    )
    args = ap.parse_args()

    console = Console(width=160)
    run_ = tool_args.prepare(args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-load-")
    model, dtype, out_dir = run_.model, run_.dtype, run_.out
    round_counts = [int(r) for r in str(args.rounds).split(",") if int(r) > 0]  # 0: probes only
    specs = {
        rounds: LoadSpec(
            users=args.users,
            rounds=rounds,
            context_words=args.context_words,
            question_words=20,
            answer_tokens=args.answer_tokens,
            concurrency=args.concurrency,
            seed=i,  # other users for each round count
        )
        for i, rounds in enumerate(round_counts)
    }
    # VLLM_SERVER_DEV_MODE: POST /reset_prefix_cache, for the probes.
    base_env = tool_args.server_env(4, VLLM_SERVER_DEV_MODE="1")
    server_args = [
        "--enable-prefix-caching",
        "--num-gpu-blocks-override",
        str(args.kv_blocks),
        "--max-num-batched-tokens",
        "4096",
    ]
    configs = server_configs(args.dram, args.small_dram, out_dir / "disk")
    results: dict[str, dict] = {}
    runs: dict[str, list] = {}
    measured: dict[str, list] = {}  # the samples themselves, for the failures' reasons
    probes: dict[str, dict] = {}
    failed_to_start: dict[str, str] = {}
    for name in args.configs.split(","):
        role, env, connector, extra = configs[name]
        console.print(f"[bold]{name}[/]: starting vLLM ({model}, {dtype})")
        log = out_dir / f"{name}.log"
        server = vllm_server(
            model, role, {**base_env, **env}, log, dtype, args=server_args,
            connector=connector, extra_config=extra,
        )  # fmt: skip
        port, reason = start(server, log)
        if reason is not None:
            failed_to_start[name] = reason
            console.print(f"[red]{name}: the server failed at start: {reason}[/]")
            continue
        try:
            url = f"http://127.0.0.1:{port}"
            for rounds, spec in specs.items():
                key = f"{name}/{rounds}r"
                before = scrape_metrics(f"{url}/metrics", prefix="")
                with console.status(f"{key}: {spec.users} users x {spec.rounds} rounds"):
                    samples, wall, _ = asyncio.run(run_load(url, spec))
                summary = summarize(samples, wall)
                summary["hit_rate"] = hit_rate(before, scrape_metrics(f"{url}/metrics", prefix=""))
                if role and args.probes:
                    with console.status(f"{key}: single-request times ({args.probes} users)"):
                        times = asyncio.run(single_request_times(url, spec, args.probes))
                    summary["single_request"] = times
                    summary["ideal"] = ideal(spec, times)
                results[key] = summary
                runs[key] = samples_json(samples)
                measured[key] = samples
                (out_dir / f"{name}-{rounds}r.json").write_text(
                    json.dumps({"label": key, "summary": summary, "samples": runs[key]})
                )
                console.print(f"{key}: {summary['request_throughput']:.3f} req/s, {wall:.0f} s")
            if args.cached_concurrency and name in ("vllm", "lmcache"):  # not lmcache-disk
                with console.status(f"{name}: cached TTFT, concurrency {args.cached_concurrency}"):
                    try:
                        probes[name] = asyncio.run(
                            cached_ttft_under_concurrency(
                                url,
                                args.cached_words,
                                concurrency=args.cached_concurrency,
                                reset=bool(role),  # vLLM alone: its own prefix cache serves
                            )
                        )
                    except RuntimeError as e:  # a failed probe: report it, keep the load runs
                        console.print(f"[red]{name}: cached-TTFT probe failed: {e}[/]")
                        probes[name] = {"error": str(e)}
        finally:
            server.__exit__(None, None, None)
            shutil.rmtree(out_dir / "disk", ignore_errors=True)  # the disk tier's chunks
    write_ttft_svg(out_dir / "ttft.svg", runs)

    for rounds, spec in specs.items():
        base = results.get(f"vllm/{rounds}r")
        table = Table(
            title=f"{spec.users} users x {spec.rounds} rounds, ~{args.context_words} words each, "
            f"concurrency {spec.concurrency}, {args.kv_blocks} KV blocks"
        )
        for col in (
            "config", "duration s", "req/s", "x vLLM", "x ideal", "TTFT p50", "TTFT p99",
            "ITL p50", "failed", "hit rates",
        ):  # fmt: skip
            table.add_column(col, justify="left" if col in ("config", "hit rates") else "right")
        for key, s in results.items():
            if not key.endswith(f"/{rounds}r"):
                continue
            ratio = s["request_throughput"] / base["request_throughput"] if base else float("nan")
            best = s.get("ideal")
            of_ideal = s["request_throughput"] / best["request_throughput"] if best else None
            rates = ", ".join(f"{k} {v:.0%}" for k, v in s["hit_rate"].items())
            table.add_row(
                key,
                f"{s['duration_s']:.0f}",
                f"{s['request_throughput']:.3f}",
                f"{ratio:.2f}",
                "-" if of_ideal is None else f"{of_ideal:.2f}",
                f"{s['ttft_s']['p50']:.2f}",
                f"{s['ttft_s']['p99']:.2f}",
                f"{s['itl_s']['p50'] * 1e3:.0f} ms",
                str(s["failed"]),
                rates,
            )
        console.print(table)
    for name, p in probes.items():
        if "error" in p:
            continue
        console.print(
            f"{name}: cached ~{p['prompt_tokens']:.0f}-token prompts, TTFT p50 "
            f"{p['single_ttft_p50_s']:.3f} s alone, {p['concurrent_ttft_p50_s']:.3f} s "
            f"{p['concurrency']} at a time: [bold]{p['ratio']:.2f}x[/] (uncached "
            f"{p['uncached_ttft_s']:.2f} s; vLLM prefix cache reset: "
            f"{p['engine_prefix_cache_reset']})"
        )
    results["probes"] = probes
    results["failed_to_start"] = failed_to_start  # type: ignore[assignment]
    for name, reason in failed_to_start.items():
        console.print(f"{name}: [red]did not start[/]: {reason}")
    (out_dir / "summary.json").write_text(json.dumps(results, indent=2))
    console.print(f"runs, logs and ttft.svg in {out_dir}")
    for key, samples in measured.items():
        failures = failure_summary(samples, f"requests of {key}")
        if failures:
            console.print(failures, style="red", markup=False)
    failed = any(s.get("failed") for k, s in results.items() if k.count("/"))
    return 1 if failed or any("error" in p for p in probes.values()) else 0


if __name__ == "__main__":
    sys.exit(tool_args.run_tool(main))
