"""The cost of storing: uncached requests with lmcache vs without a connector, A/B.

The library code of ``tools/bench_store_cost.py``. An uncached request with
lmcache computes its prefill as plain vLLM does and then stores its KV; this
measures what that store adds to the request. Both configurations are alive at
once, each in its own process (vLLM's offline ``LLM`` API in a child that runs
one prompt per command: ``python -m lmcache_vllm.bench.store_cost --child``, or
vLLM's OpenAI server with ``server=True``), and the same new prompt goes to
one, then the other, alternating which goes first: only one computes at a
time, and each pair is measured within seconds, so the machine's drift (up to
2x from minute to minute here) cancels in the paired ratio. Every prompt is
new (random token ids), vLLM's prefix cache is off, and each prompt's wall
time is measured around ``generate`` (TTFT for the server). The lmcache side
also reports the connector's own ``lmcache:time_to_store`` histogram: the
time spent inside the stores.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lmcache_core.bench.client import BenchmarkFailed, OpenAIClient
from lmcache_core.bench.paired import spread
from lmcache_core.bench.scrape import scrape_metrics

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
    m = scrape_metrics(f"http://127.0.0.1:{port}/metrics", prefix="lmcache:")
    return m.get("lmcache:time_to_store_sum", 0.0)


def child(args: argparse.Namespace) -> int:
    """One configuration with vLLM's offline API; runs ``<seed>`` lines from stdin,
    answers ``RESULT <wall s> <store s>`` for each."""
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

    def __init__(self, model: str, config: str, dtype: str, prompt_tokens: int) -> None:
        cmd = [
            sys.executable, "-m", "lmcache_vllm.bench.store_cost", "--child", "--config", config,
            "--dtype", dtype, "--model", model, "--prompt-tokens", str(prompt_tokens),
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
        raise BenchmarkFailed(f"the benchmark child died; its log ({self.log.name}):\n"
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

    def __init__(
        self, model: str, config: str, dtype: str, prompt_tokens: int, logs: Path,
        stack: ExitStack,
    ) -> None:  # fmt: skip
        from lmcache_core.testing.servers import free_port

        from lmcache_vllm.testing import vllm_server

        self.metrics_port = free_port() if config == "lmcache" else None
        port = stack.enter_context(
            vllm_server(
                model, "kv_both" if config == "lmcache" else None, _env(),
                logs / f"{config}-{dtype}.log", dtype,
                extra_config={"metrics_port": self.metrics_port}, max_model_len=8192,
                args=["--max-num-batched-tokens", "8192"],
            )
        )  # fmt: skip
        self.client = OpenAIClient(f"http://127.0.0.1:{port}")
        self.prompt_tokens = prompt_tokens

    def run(self, seed: int) -> tuple[float, float]:
        before = _time_to_store(self.metrics_port) if self.metrics_port else 0.0
        r = self.client.complete(prompt(seed, self.prompt_tokens), max_tokens=1, check=True)
        after = _time_to_store(self.metrics_port) if self.metrics_port else 0.0
        return r.ttft_s, after - before

    def close(self) -> None:
        pass


def measure(
    model: str,
    dtype: str,
    *,
    prompt_tokens: int = 4000,
    pairs: int = 6,
    server: bool = False,
    logs: Path | None = None,
    settle_s: float = 1.2,
    on_pair: Callable[[], None] | None = None,
) -> dict:
    """Alternate new prompts between the two sides; per-prompt walls and paired ratios.

    ``server``: vLLM's OpenAI server (TTFT, logs in ``logs``), else the offline
    ``LLM`` API in a child process per side (wall time of ``generate``).
    ``settle_s``: a pause before each prompt (vLLM's workers poll for a second
    after a request, which would slow the other side on a machine with few cores).
    """
    with ExitStack() as stack:
        sides: dict[str, Any] = {}
        for config in ("none", "lmcache"):
            if server:
                logs = logs or Path(tempfile.mkdtemp(prefix="lmcache-storecost-"))
                sides[config] = ServerSide(model, config, dtype, prompt_tokens, logs, stack)
            else:
                side = OfflineSide(model, config, dtype, prompt_tokens)
                stack.callback(side.close)
                sides[config] = side
        for config, side in sides.items():  # warm-up: page faults, thread pools, first store
            side.run(10_000 + len(config))
        walls: dict[str, list[float]] = {"none": [], "lmcache": []}
        stores: list[float] = []
        ratios: list[float] = []
        n = pairs
        for i in range(n):
            order = ("none", "lmcache") if i % 2 == 0 else ("lmcache", "none")
            got = {}
            for config in order:
                time.sleep(settle_s)
                got[config] = sides[config].run(i + 1)
                walls[config].append(got[config][0])
            stores.append(got["lmcache"][1])
            ratios.append(got["lmcache"][0] / got["none"][0])
            if on_pair is not None:
                on_pair()
    return {
        "dtype": dtype,
        "pairs": n,
        "no_connector_median_s": statistics.median(walls["none"]),
        "lmcache_median_s": statistics.median(walls["lmcache"]),
        "paired_ratio_median": statistics.median(ratios),
        "paired_ratio": spread(ratios).as_dict(),
        "store_s_median": statistics.median(stores),
        "walls": walls,
        "stores_s": stores,
        "paired_ratios": ratios,
    }


def _child_main() -> int:
    ap = argparse.ArgumentParser(description="one side of the store-cost A/B (a child)")
    ap.add_argument("--child", action="store_true", required=True)
    ap.add_argument("--config", choices=["none", "lmcache"], required=True)
    ap.add_argument("--dtype", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, required=True)
    return child(ap.parse_args())


if __name__ == "__main__":
    sys.exit(_child_main())
