"""Disaggregated prefill (1P1D): TTFT at the decode instance against a single instance.

The library code of ``tools/bench_pd.py``. Three vLLM servers are up at once
(one computes at a time): a plain single instance, and a prefill
(``kv_producer``) and a decode (``kv_consumer``) instance sharing KV over the
p2p tier (NIXL, a private redis-server as the index). Each server is warmed
up with the same document first; then, document by document, alternating
which goes first (a pause before each switch): the single instance's TTFT,
and the router's two steps, the prefill request (``max_tokens=1``) and the
decode request, whose TTFT is the figure. The result is the median of the
per-document ratios decode / single, with its spread. A failed request raises
:class:`~lmcache_core.bench.client.BenchmarkFailed` with the server's reason
(a document longer than ``max_model_len`` says so, in tokens).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lmcache_core.bench.client import OpenAIClient
from lmcache_core.bench.paired import spread
from lmcache_core.testing.servers import RedisServer

from lmcache_vllm.testing.server import vllm_server


def measure_pd(
    model: str,
    dtype: str,
    docs: Sequence[str],
    env: Mapping[str, str],
    logs: Path,
    *,
    warmup: str | None = None,
    max_model_len: int = 4096,
    settle_s: float = 1.2,
    on_doc: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Single-instance TTFT and decode-instance TTFT of every document, paired.

    ``settle_s``: a pause before switching between the single instance and the
    pair (vLLM's workers poll for a second after a request, which would slow
    whichever side goes next on a machine with few cores)."""
    single: list[float] = []
    decode_ttft: list[float] = []
    prefill_s: list[float] = []
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        p2p = {
            "LMCACHE_ENABLE_P2P": "true",
            "LMCACHE_P2P_INDEX_URL": redis.url,
            # The p2p index is shared: it requires the deployment secret (one per run).
            "LMCACHE_AUTH_SECRET": os.environ.get("LMCACHE_AUTH_SECRET") or os.urandom(32).hex(),
        }

        def start(role: str | None, name: str) -> OpenAIClient:
            port = stack.enter_context(
                vllm_server(
                    model, role, {**env, **p2p}, logs / f"{name}.log", dtype,
                    max_model_len=max_model_len,
                )
            )  # fmt: skip
            return OpenAIClient(f"http://127.0.0.1:{port}")

        one = start(None, "single")
        prefill = start("kv_producer", "prefill")
        decode = start("kv_consumer", "decode")

        def run_single(doc: str, label: str) -> float:
            time.sleep(settle_s)
            return one.complete(doc, max_tokens=1, label=label, check=True).ttft_s

        def run_pd(doc: str, label: str) -> tuple[float, float]:
            time.sleep(settle_s)
            p = prefill.complete(doc, max_tokens=1, label=label, check=True).ttft_s
            return p, decode.complete(doc, max_tokens=1, label=label, check=True).ttft_s

        if warmup is not None:
            run_single(warmup, "warm-up")
            run_pd(warmup, "warm-up")
        for i, doc in enumerate(docs):
            label = f"doc{i}"
            if i % 2 == 0:
                single.append(run_single(doc, label))
                p, d = run_pd(doc, label)
            else:
                p, d = run_pd(doc, label)
                single.append(run_single(doc, label))
            prefill_s.append(p)
            decode_ttft.append(d)
            if on_doc is not None:
                on_doc(i)
    ratios = [d / s for d, s in zip(decode_ttft, single)]
    return {
        "docs": len(docs),
        "single_ttft_s": statistics.median(single),
        "prefill_instance_ttft_s": statistics.median(prefill_s),
        "decode_ttft_s": statistics.median(decode_ttft),
        "decode_over_single": spread(ratios).as_dict(),
        "per_document": {"single": single, "prefill": prefill_s, "decode": decode_ttft},
    }
