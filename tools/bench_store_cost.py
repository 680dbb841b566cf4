"""The cost of storing: uncached requests with lmcache vs without a connector, A/B.

An uncached request with lmcache computes its prefill as plain vLLM does and
then stores its KV; this measures what that store adds to the request. Both
configurations are alive at once, each in its own process (vLLM's offline
``LLM`` API in a child that runs one prompt per command, or vLLM's OpenAI
server with ``--server``), and the same new prompt goes to one, then the
other, alternating which goes first: only one computes at a time, and each
pair is measured within seconds, so the machine's drift (up to 2x from minute
to minute here) cancels in the paired ratio. Every prompt is new (random
token ids), vLLM's prefix cache is off, and each prompt's wall time is
measured around ``generate`` (TTFT for the server). The lmcache side also
reports the connector's own ``lmcache:time_to_store`` histogram: the time
spent inside the stores.

    python tools/bench_store_cost.py                       # bf16 and fp32, offline API
    python tools/bench_store_cost.py --server --dtypes bfloat16
    python tools/bench_store_cost.py --json store-cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096  # the test model's; token ids below it are valid for any larger vocabulary


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        "VLLM_CPU_OMP_THREADS_BIND": "0-1" if os.cpu_count() == 2 else "all",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": os.environ.get("LMCACHE_MAX_LOCAL_CPU_SIZE", "2GiB"),
    }


def prompt(seed: int, num_tokens: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, VOCAB) for _ in range(num_tokens)]


def _time_to_store(port: int) -> float:
    from lmcache_core.workload import scrape_metrics

    m = scrape_metrics(f"http://127.0.0.1:{port}/metrics", prefix="lmcache:")
    return m.get("lmcache:time_to_store_sum", 0.0)


def child(args: argparse.Namespace) -> int:
    """One configuration with vLLM's offline API; runs ``<seed>`` lines from stdin."""
    from lmcache_core.testing.servers import free_port
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw: dict = {}
    metrics_port = free_port()
    if args.config == "lmcache":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMCacheKVConnector",
            kv_connector_module_path="lmcache_vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"metrics_port": metrics_port},
        )
    llm = LLM(
        model=args.model, dtype=args.dtype, enforce_eager=True, enable_prefix_caching=False,
        max_model_len=args.prompt_tokens + 64, seed=0, **kw,
    )  # fmt: skip
    sp = SamplingParams(max_tokens=1, temperature=0)
    print("READY", flush=True)
    for line in sys.stdin:
        seed = int(line)
        before = _time_to_store(metrics_port) if args.config == "lmcache" else 0.0
        t0 = time.perf_counter()
        llm.generate(TokensPrompt(prompt_token_ids=prompt(seed, args.prompt_tokens)), sp,
                     use_tqdm=False)  # fmt: skip
        wall = time.perf_counter() - t0
        store = _time_to_store(metrics_port) - before if args.config == "lmcache" else 0.0
        print(f"RESULT {wall} {store}", flush=True)
    return 0


class OfflineSide:
    """A child process holding one ``LLM``; ``run(seed)`` -> (wall s, store s)."""

    def __init__(self, args: argparse.Namespace, config: str, dtype: str) -> None:
        cmd = [
            sys.executable, __file__, "--child", "--config", config, "--dtype", dtype,
            "--model", args.model, "--prompt-tokens", str(args.prompt_tokens),
        ]  # fmt: skip
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"storecost-{config}-", delete=False)
        self.proc = subprocess.Popen(
            cmd, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True,
        )  # fmt: skip
        self._expect("READY")

    def _expect(self, word: str) -> list[str]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(word):
                return line.split()[1:]
        self.log.seek(0)
        raise RuntimeError(f"the benchmark child died; its log ({self.log.name}):\n"
                           + self.log.read()[-4000:])  # fmt: skip

    def run(self, seed: int) -> tuple[float, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        wall, store = self._expect("RESULT")
        return float(wall), float(store)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class ServerSide:
    """vLLM's OpenAI server; ``run(seed)`` -> (TTFT s, store s)."""

    def __init__(self, args: argparse.Namespace, config: str, dtype: str, stack: ExitStack):
        from lmcache_core.testing.servers import free_port
        from lmcache_core.workload import OpenAIClient
        from lmcache_vllm.testing import vllm_server

        self.metrics_port = free_port() if config == "lmcache" else None
        log = Path(tempfile.mkdtemp(prefix="lmcache-storecost-")) / f"{config}.log"
        port = stack.enter_context(
            vllm_server(
                args.model, "kv_both" if config == "lmcache" else None, _env(), log, dtype,
                    extra_config={"metrics_port": self.metrics_port}, max_model_len=8192,
                args=["--max-num-batched-tokens", "8192"],
            )
        )  # fmt: skip
        self.client = OpenAIClient(f"http://127.0.0.1:{port}")
        self.prompt_tokens = args.prompt_tokens

    def run(self, seed: int) -> tuple[float, float]:
        before = _time_to_store(self.metrics_port) if self.metrics_port else 0.0
        r = self.client.complete(prompt(seed, self.prompt_tokens), max_tokens=1)
        if r.error:
            raise RuntimeError(f"a request failed: {r.error}")
        after = _time_to_store(self.metrics_port) if self.metrics_port else 0.0
        return r.ttft_s, after - before

    def close(self) -> None:
        pass


def measure(args: argparse.Namespace, dtype: str) -> dict:
    """Alternate new prompts between the two sides; per-prompt walls and paired ratios."""
    from rich.progress import Progress

    with ExitStack() as stack:
        sides = {}
        for config in ("none", "lmcache"):
            if args.server:
                sides[config] = ServerSide(args, config, dtype, stack)
            else:
                side = OfflineSide(args, config, dtype)
                stack.callback(side.close)
                sides[config] = side
        for config, side in sides.items():  # warm-up: page faults, thread pools, first store
            side.run(10_000 + len(config))
        walls: dict[str, list[float]] = {"none": [], "lmcache": []}
        stores: list[float] = []
        ratios: list[float] = []
        n = args.prompts * args.runs
        with Progress(transient=True) as progress:
            task = progress.add_task(f"{dtype}: pairs of prompts", total=n)
            for i in range(n):
                order = ("none", "lmcache") if i % 2 == 0 else ("lmcache", "none")
                got = {}
                for config in order:
                    got[config] = sides[config].run(i + 1)
                    walls[config].append(got[config][0])
                stores.append(got["lmcache"][1])
                ratios.append(got["lmcache"][0] / got["none"][0])
                progress.advance(task)
    return {
        "dtype": dtype,
        "pairs": n,
        "no_connector_median_s": statistics.median(walls["none"]),
        "lmcache_median_s": statistics.median(walls["lmcache"]),
        "paired_ratio_median": statistics.median(ratios),
        "store_s_median": statistics.median(stores),
        "walls": walls,
        "stores_s": stores,
        "paired_ratios": ratios,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / ".cache/models/llama-200m"))
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--prompts", type=int, default=3, help="prompt pairs per run")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--server", action="store_true", help="vLLM's OpenAI server, not LLM")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=["none", "lmcache"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not Path(args.model).exists():
        sys.path.insert(0, str(ROOT / "tools"))
        from make_test_model import ensure_model

        ensure_model(Path(args.model), preset="bench")
    from rich.console import Console
    from rich.table import Table

    console = Console()
    api = "server (TTFT)" if args.server else "offline LLM.generate (wall time)"
    rows = [measure(args, dtype) for dtype in args.dtypes.split(",")]
    table = Table(title=f"cost of storing: {args.prompt_tokens}-token uncached prompts, {api}")
    for col in ("dtype", "pairs", "no connector (s)", "lmcache (s)", "paired ratio",
                "in the store (s)", "store / no connector"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["dtype"], str(r["pairs"]), f"{r['no_connector_median_s']:.3f}",
            f"{r['lmcache_median_s']:.3f}", f"{r['paired_ratio_median']:.3f}",
            f"{r['store_s_median']:.3f}",
            f"{r['store_s_median'] / r['no_connector_median_s']:.1%}",
        )  # fmt: skip
    console.print(table)
    console.print("medians; paired ratio: lmcache / no connector for the same prompt, back to back")
    if args.json:
        Path(args.json).write_text(json.dumps({"api": api, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
