"""MP mode's figures: the lmcache server against in-process lmcache, vLLM alone and memcpy.

The driver of :mod:`lmcache_server.bench` (shared-memory store and load against
memcpy and the in-process DRAM tier) and :mod:`lmcache_vllm.bench.mp` (real
vLLM servers: hit and uncached TTFT through the server, in-process, and vLLM
alone with its prefix cache; a second engine's hits on the first's documents).
Every figure is a median of ratios paired within seconds in this one run.

    python tools/bench_server.py                 # both parts, the random 200M model
    python tools/bench_server.py --part core     # shared memory vs memcpy only
    python tools/bench_server.py --part vllm --docs 8 --prompt-tokens 4000
    python tools/bench_server.py --json mp.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lmcache_core.bench.client import BenchmarkFailed
from lmcache_server.bench import run_server_core_benchmark
from lmcache_server.testing import ServerProcess
from lmcache_vllm.bench.mp import measure, restart_hit_rate
from lmcache_vllm.testing import tool_args
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def _core(console: Console, rounds: int) -> dict:
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("shared memory vs memcpy", total=rounds + 3)
        r = run_server_core_benchmark(
            rounds=rounds, on_step=lambda m: progress.update(task, description=m, advance=1)
        )
    d = r.as_dict()
    t = Table(title=f"store and load of {d['chunks']} chunks of 32 MiB (Llama-3-8B shape)")
    for col in ("path", "GB/s", "vs memcpy"):
        t.add_column(col, justify="right")
    t.add_row("memcpy (baseline)", f"{d['GBps']['memcpy']:.2f}", "1.000")
    for name in ("local_store", "local_load", "server_store", "server_load"):
        t.add_row(name.replace("_", " "), f"{d['GBps'][name]:.2f}", f"{d['vs_memcpy'][name]:.3f}")
    console.print(t)
    console.print(
        f"server / in-process: store {d['server_vs_local']['store']:.3f}, "
        f"load {d['server_vs_local']['load']:.3f}; bytes equal: {d['bytes_equal']}"
    )
    if not d["bytes_equal"]:
        raise BenchmarkFailed("loaded bytes differ from stored bytes")
    return d


def _vllm(console: Console, args: argparse.Namespace, run_: tool_args.ToolRun) -> dict:
    cache = {"chunk_size": 256, "max_local_cpu_size": "2GiB"}
    with ServerProcess(cache, workdir=run_.out / "lmcache-server") as server:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("documents", total=args.docs * (2 if args.one_engine else 3))
            r = measure(
                str(run_.model), run_.dtype, server.url, prompt_tokens=args.prompt_tokens,
                docs=args.docs, two_engines=not args.one_engine, logs=run_.out,
                on_doc=lambda: progress.advance(task),
            )  # fmt: skip
    t = Table(title=f"median TTFT, {args.prompt_tokens}-token prompts, {r['dtype']}")
    for col in ("phase", "side", "uncached (s)", "hit (s)", "in the stores (s)"):
        t.add_column(col, justify="right")
    for phase, d in r["phases"].items():
        for side, hits in d["hit"].items():
            unc = d["uncached"].get(side)
            st = d.get("store_s", {}).get(side)
            t.add_row(
                phase, side, f"{statistics.median(unc):.3f}" if unc else "-",
                f"{statistics.median(hits):.3f}", f"{statistics.median(st):.3f}" if st else "-",
            )  # fmt: skip
    console.print(t)
    p = Table(title="paired ratios (same document, seconds apart)")
    for col in ("ratio", "median", "IQR", "min-max"):
        p.add_column(col, justify="right")
    for name, s in r["paired"].items():
        p.add_row(name, f"{s['median']:.3f}", f"{s['q1']:.3f}-{s['q3']:.3f}",
                  f"{s['lo']:.3f}-{s['hi']:.3f}")  # fmt: skip
    console.print(p)
    share = r["store_share_of_uncached"]
    console.print(
        f"time in the stores / uncached TTFT: server {share['server']:.2%}, "
        f"in-process {share['inproc']:.2%}"
    )
    return r


def _restart(console: Console, args: argparse.Namespace, run_: tool_args.ToolRun) -> dict:
    cache = {"chunk_size": 256, "max_local_cpu_size": "2GiB"}
    with ServerProcess(cache, workdir=run_.out / "lmcache-server-restart") as server:
        r = restart_hit_rate(
            str(run_.model), run_.dtype, server.url, prompt_tokens=args.prompt_tokens,
            docs=max(2, args.docs - 1), logs=run_.out,
        )  # fmt: skip
    console.print(
        f"hit rate of a repeated workload: {r['before_restart']:.1%} before the engine "
        f"was killed (-9), {r['after_restart']:.1%} after it restarted "
        f"(first pass: {r['first_pass']:.1%})"
    )
    if r["after_restart"] < r["before_restart"] - 0.01:
        raise BenchmarkFailed("the restarted engine hit less than before the restart")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tool_args.add_arguments(ap, model="random")
    ap.add_argument("--part", choices=["all", "core", "vllm", "restart"], default="all")
    ap.add_argument("--rounds", type=int, default=10, help="core part: rounds")
    ap.add_argument("--docs", type=int, default=6, help="vllm part: documents")
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--one-engine", action="store_true", help="no second vLLM on the server")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    run_ = tool_args.prepare(args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-mp-")
    console = Console()
    out: dict = {}
    if args.part in ("all", "core"):
        out["core"] = _core(console, args.rounds)
    if args.part in ("all", "vllm"):
        out["vllm"] = _vllm(console, args, run_)
    if args.part in ("all", "restart"):
        out["restart"] = _restart(console, args, run_)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(tool_args.run_tool(main))
