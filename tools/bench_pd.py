"""1P1D benchmark: TTFT at the decode instance vs a single instance computing the prompt.

    python tools/bench_pd.py [--model random|smollm2|PATH] [--doc-words 3540] [--docs 4]

The driver of :mod:`lmcache_vllm.bench.pd`: a plain single vLLM server, and a
prefill (``kv_producer``) and a decode (``kv_consumer``) server sharing KV
over the p2p tier (NIXL, a private redis-server as the index), all up at
once. Per long document, alternating: TTFT of the single instance; then the
router's two steps, the prefill request (max_tokens=1) and the decode
request, whose TTFT is the figure. Prints the median of the per-document
ratios decode / single with its spread (target <= 0.25). A failed request
fails the run with the server's reason (a document longer than
``--max-model-len`` says how long, in tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmcache_core.bench.workload import long_doc_qa
from lmcache_vllm.bench.pd import measure_pd
from lmcache_vllm.testing import tool_args

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tool_args.add_arguments(ap, model="random")
    ap.add_argument("--doc-words", type=int, default=3540, help="3540: ~4000 tokens")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    run_ = tool_args.prepare(args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-pd-")
    docs = [prompt for _, prompt in long_doc_qa(args.docs + 1, args.doc_words, seed=3)]
    env = tool_args.server_env(2, LMCACHE_MAX_LOCAL_CPU_SIZE="2GiB")
    print(f"model {run_.model}, dtype {run_.dtype}; logs in {run_.out}", file=sys.stderr)
    summary = measure_pd(
        run_.model, run_.dtype, docs[1:], env, run_.out, warmup=docs[0],
        max_model_len=args.max_model_len,
    )  # fmt: skip
    ratio = summary["decode_over_single"]
    print(json.dumps({k: v for k, v in summary.items() if k != "per_document"}, indent=2))
    print(
        f"TTFT at the decode instance / single instance, per document = {ratio['median']:.3f} "
        f"(IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}, n={ratio['n']}; target <= 0.25)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(tool_args.run_tool(main))
