"""Issue 16's main figure with vLLM's own client, in one command: vLLM alone, then
vLLM with lmcache, each measured by ``vllm bench serve`` (prefix_repetition).

    .venv/bin/python tools/bench_vllm_serve_ab.py            # the issue's setting
    .venv/bin/python tools/bench_vllm_serve_ab.py --configs vllm,vllm-offload,lmcache

The setting (issue 16): 16 prefixes of 3000 tokens + 100, 64 prompts, 16
output tokens, concurrency 2, KV space 1 GiB (``VLLM_CPU_KVCACHE_SPACE``),
vLLM's prefix caching on, the local random ~200M Llama in bf16 (where the
CPU has AVX512-BF16/AMX), lmcache with a 4 GiB DRAM tier. One server at a
time, the same seed for both, so both serve the same prompts; prints
duration, request throughput, TTFT median/p99 and failures with the ratio
against vLLM alone, and writes vLLM's own result files to ``--out-dir``.
``vllm-offload`` is vLLM's SimpleCPUOffloadConnector with the same DRAM (it
fails at start on vLLM's CPU backend; that is reported and the run goes on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lmcache_core.bench.client import BenchmarkFailed
from lmcache_vllm.bench.servers import server_configs, start
from lmcache_vllm.testing import tool_args, vllm_server
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def request_failures(name: str, result: dict, num_prompts: int) -> str | None:
    """None if every prompt completed; else how many failed and why (vLLM's client keeps
    each request's error, with ``--save-detailed``)."""
    if result["completed"] == num_prompts:
        return None
    errors = [e for e in result.get("errors") or [] if e]
    reasons = list(dict.fromkeys(e.strip().splitlines()[-1][:500] for e in errors))
    lines = [f"{name}: {num_prompts - result['completed']} of {num_prompts} requests failed"]
    lines += [f"  {r}" for r in reasons[:3]] or ["  (vllm bench serve recorded no reason)"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    tool_args.add_arguments(ap, model="random")
    ap.add_argument("--configs", default="vllm,lmcache")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prefixes", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=3000)
    ap.add_argument("--suffix-len", type=int, default=100)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--kv-space-gib", default="1")
    ap.add_argument("--dram", default="4GiB")
    args = ap.parse_args()

    console = Console(width=150)
    run_ = tool_args.prepare(
        args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-vllm-bench-"
    )
    model, dtype, out_dir = run_.model, run_.dtype, run_.out
    env = tool_args.server_env(args.kv_space_gib)
    configs = server_configs(args.dram)
    results: dict[str, dict] = {}
    for name in args.configs.split(","):
        role, extra_env, connector, extra = configs[name]
        console.print(f"[bold]{name}[/]: starting vLLM ({model}, {dtype})")
        log = out_dir / f"{name}.log"
        server = vllm_server(
            model, role, {**env, **extra_env}, log, dtype, args=["--enable-prefix-caching"],
            connector=connector, extra_config=extra,
        )  # fmt: skip
        port, reason = start(server, log)
        if reason is not None:
            results[name] = {"error": reason}
            console.print(f"[red]{name}: did not start: {reason}[/]")
            continue
        try:
            cmd = [
                sys.executable, str(ROOT / "tools" / "vllm_bench_serve.py"),
                "--base-url", f"http://127.0.0.1:{port}", "--model", model,
                "--dataset-name", "prefix_repetition", "--num-prompts", str(args.num_prompts),
                "--prefix-repetition-num-prefixes", str(args.prefixes),
                "--prefix-repetition-prefix-len", str(args.prefix_len),
                "--prefix-repetition-suffix-len", str(args.suffix_len),
                "--prefix-repetition-output-len", str(args.output_len),
                "--max-concurrency", str(args.concurrency), "--request-rate", "inf",
                "--seed", "0", "--percentile-metrics", "ttft,itl",
                "--metric-percentiles", "50,99", "--save-result", "--save-detailed",
                "--result-dir", str(out_dir), "--result-filename", f"{name}.json",
            ]  # fmt: skip
            with console.status(f"{name}: vllm bench serve, {args.num_prompts} prompts"):
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            (out_dir / f"{name}-bench.txt").write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                results[name] = {"error": f"vllm bench serve failed ({r.returncode})"}
                console.print(f"[red]{name}: {results[name]['error']}[/]\n{r.stderr[-2000:]}")
                continue
            results[name] = json.loads((out_dir / f"{name}.json").read_text())
        finally:
            server.__exit__(None, None, None)

    base = results.get("vllm", {})
    table = Table(title="vllm bench serve, prefix_repetition: "
                  f"{args.prefixes} prefixes x {args.prefix_len}+{args.suffix_len} tokens, "
                  f"{args.num_prompts} prompts, concurrency {args.concurrency}")  # fmt: skip
    for col in ("config", "duration s", "req/s", "x vLLM", "TTFT median", "TTFT p99",
                "ITL median", "completed", "failed"):  # fmt: skip
        table.add_column(col, justify="left" if col == "config" else "right")
    for name, r in results.items():
        if "error" in r:
            table.add_row(name, "did not run: " + r["error"][:80], *[""] * 7)
            continue
        ratio = (
            base["duration"] / r["duration"] if base.get("duration") else float("nan")
        )  # by duration: the same prompts in both
        table.add_row(
            name,
            f"{r['duration']:.1f}",
            f"{r['request_throughput']:.3f}",
            f"{ratio:.2f}",
            f"{r['median_ttft_ms'] / 1e3:.2f} s",
            f"{r['p99_ttft_ms'] / 1e3:.2f} s",
            f"{r['median_itl_ms']:.0f} ms",
            str(r["completed"]),
            str(r.get("failed", args.num_prompts - r["completed"])),
        )
    console.print(table)
    console.print(f"results and logs in {out_dir}")
    ran = {name: r for name, r in results.items() if "error" not in r}
    failures = [request_failures(n, r, args.num_prompts) for n, r in ran.items()]
    failures = [f for f in failures if f]
    if failures:
        raise BenchmarkFailed("\n".join(failures))
    if not ran:
        raise BenchmarkFailed("no configuration ran: " + "; ".join(
            f"{n}: {r['error']}" for n, r in results.items()
        ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(tool_args.run_tool(main))
