"""The main job: vLLM serving with lmcache, a long-document QA workload, TTFT per pass.

Starts vLLM's OpenAI server with the lmcache connector (and, with
``--baseline``, a second server without it, so that the cost of storing is
measured against plain vLLM in the same run, requests alternating between the
two), sends every document twice (the first pass fills the cache, the second
hits it) and prints TTFT per pass, the hit rate and the bytes stored.

On this CPU it uses a random ~200M-parameter Llama made locally
(tools/make_test_model.py --preset bench); give ``--model`` to serve another.
vLLM's own prefix cache is off in both servers, so the second pass measures
lmcache, not vLLM's in-memory cache.

    python tools/bench_vllm.py --baseline
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lmcache_core.testing.servers import free_port
from lmcache_core.workload import OpenAIClient, long_doc_qa, scrape_metrics
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: without them vLLM's CPU bf16 matmuls are several times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_dtype() -> str:
    return "bfloat16" if gpu_present() or cpu_has_fast_bf16() else "float32"


def gpu_present() -> bool:
    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


class Server:
    """A vLLM OpenAI server in a child process."""

    def __init__(
        self, model: str, *, lmcache: bool, log: Path, max_model_len: int, dtype: str
    ) -> None:
        self.port = free_port()
        env = {**os.environ}
        if not gpu_present():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if os.cpu_count() == 2 else "all")
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--dtype",
            dtype,
            "--enforce-eager",
            "--max-model-len",
            str(max_model_len),
            "--no-enable-prefix-caching",
            "--max-num-batched-tokens",
            str(max_model_len),
        ]
        if lmcache:
            env.setdefault("LMCACHE_MAX_LOCAL_CPU_SIZE", "4GiB")
            cmd += [
                "--kv-transfer-config",
                json.dumps(
                    {
                        "kv_connector": "LMCacheKVConnector",
                        "kv_connector_module_path": "lmcache_vllm",
                        "kv_role": "kv_both",
                        "kv_load_failure_policy": "recompute",
                    }
                ),
            ]
        self.log = log
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited ({self.proc.returncode}); see {self.log}:\n"
                    + self.log.read_text()[-3000:]
                )
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"vLLM did not start within {timeout_s}s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model path or name (default: a local random ~200M Llama)")
    ap.add_argument("--docs", type=int, default=2, help="documents in the workload")
    ap.add_argument(
        "--dtype",
        default=None,
        help="model dtype (default: bfloat16 on GPUs and CPUs with AMX/AVX512-BF16, "
        "else float32, which such CPUs run several times faster)",
    )
    ap.add_argument(
        "--doc-words",
        type=int,
        default=900,
        help="words per document (900: ~1000 tokens; 3540: ~4000 tokens)",
    )
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="also serve plain vLLM and alternate uncached requests between the two",
    )
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()

    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tools"))
        from make_test_model import ensure_model

        with console.status("making the local benchmark model (random ~200M Llama)"):
            model = str(ensure_model(ROOT / ".cache" / "models" / "llama-200m", preset="bench"))
    dtype = args.dtype or default_dtype()
    console.print(f"model {model}, dtype {dtype}")
    logs = Path(tempfile.mkdtemp(prefix="lmcache-bench-"))
    docs = long_doc_qa(args.docs, args.doc_words)
    # One server at a time (two would fight over the cores). Plain vLLM runs
    # before and after lmcache, and its two medians are averaged, so a drift
    # of the machine's speed during the run cancels to first order.
    phases = [("lmcache", args.passes)]
    if args.baseline:
        phases = [("vllm", 1), ("lmcache", args.passes), ("vllm", 1)]
    total = sum(n for _, n in phases) * len(docs)
    results: dict[tuple[str, str], list[float]] = {}
    tokens: list[int] = []
    metrics: dict[str, float] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("requests", total=total)
        for i, (name, passes) in enumerate(phases):
            progress.update(task, description=f"starting vLLM ({name})")
            server = Server(
                model,
                lmcache=name == "lmcache",
                log=logs / f"vllm-{i}-{name}.log",
                max_model_len=8192,
                dtype=dtype,
            )
            try:
                server.wait_ready()
                client = OpenAIClient(server.url)
                client.complete("warm up " * 50, max_tokens=2)  # first-request costs
                for p in range(passes):
                    pass_name = "uncached" if p == 0 else f"pass {p + 1} (cached)"
                    for label, prompt in docs:
                        progress.update(task, description=f"{name}: {pass_name}: {label}")
                        r = client.complete(prompt, max_tokens=8, label=label)
                        if r.error:
                            raise RuntimeError(f"request {label} to {name} failed: {r.error}")
                        results.setdefault((pass_name, name), []).append(r.ttft_s)
                        if r.prompt_tokens:
                            tokens.append(r.prompt_tokens)
                        progress.advance(task)
                if name == "lmcache":
                    # lmcache's metrics are on vLLM's own /metrics (connector stats).
                    metrics = scrape_metrics(f"{server.url}/metrics")
            finally:
                server.stop()

    figures: dict[str, float] = {}
    mean_tokens = int(statistics.fmean(tokens)) if tokens else "?"
    table = Table(
        title=f"long-document QA: {args.docs} documents of ~{mean_tokens} tokens, "
        "TTFT per pass (median of the documents)"
    )
    table.add_column("pass")
    table.add_column("server")
    table.add_column("median TTFT (s)", justify="right")
    table.add_column("mean TTFT (s)", justify="right")
    for (pass_name, server), ttfts in results.items():
        figures[f"{pass_name}/{server}"] = statistics.median(ttfts)
        table.add_row(
            pass_name, server, f"{statistics.median(ttfts):.3f}", f"{statistics.fmean(ttfts):.3f}"
        )
    console.print(table)
    uncached = figures["uncached/lmcache"]
    cached = [v for k, v in figures.items() if k.startswith("pass ")]
    lookup = metrics.get("lmcache:num_lookup_tokens", 0)
    hit_rate = metrics.get("lmcache:num_lookup_hits", 0) / lookup if lookup else 0.0
    summary = {
        "prompt_tokens_mean": statistics.fmean(tokens) if tokens else None,
        "ttft_uncached_s": uncached,
        "ttft_cached_s": cached[-1] if cached else None,
        "cached_over_uncached": cached[-1] / uncached if cached else None,
        "hit_rate": hit_rate,
        "stored_bytes": metrics.get("lmcache:stored_bytes", 0),
        "retrieved_bytes": metrics.get("lmcache:retrieved_bytes", 0),
    }
    if args.baseline:
        summary["ttft_uncached_plain_vllm_s"] = figures["uncached/vllm"]
        summary["uncached_with_lmcache_over_plain_vllm"] = uncached / figures["uncached/vllm"]
    console.print(
        f"hit rate {hit_rate:.0%} of looked-up tokens; stored "
        f"{summary['stored_bytes'] / 2**20:.0f} MiB, retrieved "
        f"{summary['retrieved_bytes'] / 2**20:.0f} MiB"
    )
    if cached:
        console.print(
            f"cached TTFT / uncached TTFT = {summary['cached_over_uncached']:.3f} (target <= 0.04)"
        )
    if args.baseline:
        console.print(
            "uncached TTFT with lmcache / plain vLLM = "
            f"{summary['uncached_with_lmcache_over_plain_vllm']:.3f} (target <= 1.05)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
