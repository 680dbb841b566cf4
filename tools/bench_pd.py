"""1P1D benchmark: TTFT at the decode instance vs a single instance computing the prompt.

    python tools/bench_pd.py [--model DIR] [--doc-words 3540] [--docs 2]

Starts (one after the other, on this machine) a plain single vLLM server, then
a prefill (``kv_producer``) and a decode (``kv_consumer``) server sharing KV
over the p2p tier (NIXL, a private redis-server as the index). For each
long document: TTFT of the single instance; then the router's two steps, the
prefill request (max_tokens=1) and the decode request, whose TTFT is the
figure. Prints medians and decode TTFT / single TTFT (target <= 0.25).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from lmcache_core.testing.servers import RedisServer
from lmcache_core.workload import OpenAIClient, long_doc_qa
from lmcache_vllm.testing import vllm_server

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / ".cache/models/llama-200m"))
    ap.add_argument("--doc-words", type=int, default=3540)
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="float32: ~5x faster than bf16 here")
    args = ap.parse_args()
    model = Path(args.model)
    if not model.exists():
        print(
            f"no model at {model}: run tools/bench_vllm.py --model random once (it makes one)",
            file=sys.stderr,
        )
        return 2
    docs = [prompt for _, prompt in long_doc_qa(args.docs, args.doc_words, seed=3)]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "2GiB",
    }
    logs = Path(tempfile.mkdtemp(prefix="lmcache-pd-"))
    single: list[float] = []
    with vllm_server(model, None, env, logs / "single.log", args.dtype) as port:
        client = OpenAIClient(f"http://127.0.0.1:{port}")
        for d in docs:
            single.append(client.complete(d, max_tokens=1).ttft_s)
    decode_ttft: list[float] = []
    prefill_s: list[float] = []
    with RedisServer() as redis:
        p2p = {"LMCACHE_ENABLE_P2P": "true", "LMCACHE_P2P_INDEX_URL": redis.url}
        with (
            vllm_server(model, "kv_producer", {**env, **p2p}, logs / "p.log", args.dtype) as p_port,
            vllm_server(model, "kv_consumer", {**env, **p2p}, logs / "d.log", args.dtype) as d_port,
        ):
            prefill = OpenAIClient(f"http://127.0.0.1:{p_port}")
            decode = OpenAIClient(f"http://127.0.0.1:{d_port}")
            for d in docs:
                prefill_s.append(prefill.complete(d, max_tokens=1).ttft_s)
                decode_ttft.append(decode.complete(d, max_tokens=1).ttft_s)
    s, dd, pp = (statistics.median(x) for x in (single, decode_ttft, prefill_s))
    summary = {
        "docs": args.docs,
        "single_ttft_s": s,
        "prefill_instance_ttft_s": pp,
        "decode_ttft_s": dd,
        "decode_over_single": dd / s,
    }
    print(json.dumps(summary, indent=2))
    print(f"TTFT at the decode instance / single instance = {dd / s:.3f} (target <= 0.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
