"""What a cached request still costs: TTFT against the tail the engine recomputes.

A cache hit never covers the whole prompt: vLLM computes at least the last
token, and a prefix cache that works in blocks (vLLM's own, and lmcache's
loads into vLLM's blocks) leaves the prompt's last partial block to be
recomputed: up to ``block_size - 1`` tokens (127 on vLLM's CPU backend, 15 on
GPUs). This measures how much of a cached request's TTFT is that tail, one
request at a time and ``--concurrency`` at a time, on one server:

    .venv/bin/python tools/bench_cached_tail.py                   # vLLM's own prefix cache
    .venv/bin/python tools/bench_cached_tail.py --config lmcache  # lmcache serves every hit

Prompts are token ids (no tokenizer in the measurement): ``--prompts`` random
bases of whole blocks are computed once, then each is sent cut to whole
blocks + ``tail`` tokens, so exactly ``tail`` tokens are recomputed (1 for
``tail`` 1: the last token). With ``--config lmcache`` vLLM's own prefix
cache is emptied before every measured request (``VLLM_SERVER_DEV_MODE``), so
every hit is lmcache's. Prints the median TTFTs and their ratios against the
1-token tail and against one request alone, in the same run.

``--next-round PAIRS`` (with ``--config lmcache``) measures a chat's round 2
(round 1 + 100 tokens) when round 1 was stored whole, its tail chunk
included, against the same when round 1 was stored cut at its last full
chunk: the tail lmcache finds in the next round's prompt, and what it saves.
``--inside PAIRS`` measures vLLM's prefix_repetition request (another
prompt's first 3000 tokens + 100 new ones) loaded through the stored chunk it
ends inside, against whole chunks only (the stored prompt cut at its last full
chunk). ``--tails ''`` skips the tail measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

from lmcache_vllm.bench.cached_tail import inside_prompts, measure, next_round_prompts, paired
from lmcache_vllm.testing import tool_args, vllm_server
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", choices=["vllm", "lmcache"], default="vllm")
    tool_args.add_arguments(ap, model="random")
    ap.add_argument("--blocks", type=int, default=30, help="whole blocks before the tail")
    ap.add_argument("--block-size", type=int, default=128, help="vLLM's (128 on its CPU backend)")
    ap.add_argument("--tails", default="1,14,64,127", help="tail tokens recomputed")
    ap.add_argument("--prompts", type=int, default=4, help="bases, and requests at once")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument(
        "--next-round", type=int, default=0, metavar="PAIRS",
        help="with --config lmcache: also round 2 of chats, round 1 stored whole vs cut",
    )  # fmt: skip
    ap.add_argument(
        "--inside", type=int, default=0, metavar="PAIRS",
        help="with --config lmcache: also prompts sharing another's first 3000 tokens, "
        "loaded through the stored chunk they end inside vs whole chunks only",
    )  # fmt: skip
    args = ap.parse_args()

    console = Console(width=140)
    run_ = tool_args.prepare(args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-tail-")
    model, dtype = run_.model, run_.dtype
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    n = (args.blocks + 1) * args.block_size
    bases = [[rng.randrange(10, vocab) for _ in range(n)] for _ in range(args.prompts)]
    tails = [int(t) for t in args.tails.split(",") if t]
    if not all(1 <= t < args.block_size for t in tails):
        ap.error(f"--tails must lie in [1, {args.block_size - 1}]")
    lmcache = args.config == "lmcache"
    env = tool_args.server_env(4, VLLM_SERVER_DEV_MODE="1", LMCACHE_MAX_LOCAL_CPU_SIZE="4GiB")
    server_args = ["--enable-prefix-caching", "--max-num-batched-tokens", "4096"]
    server_args += ["--block-size", str(args.block_size)]
    log = run_.out / "vllm.log"
    console.print(f"{args.config}: {model} ({dtype}), prompts of {args.blocks} blocks + tail")
    with vllm_server(
        model, "kv_both" if lmcache else None, env, log, dtype, args=server_args,
        max_model_len=max(4096, n + 16),
    ) as port:  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        res = {}
        if tails:
            res = asyncio.run(
                measure(
                    url, model, bases, tails, args.block_size, args.prompts, args.repeats, lmcache
                )
            )
        rounds = inside = None
        if args.next_round and lmcache:
            make = next_round_prompts(vocab, 256, args.block_size, rng)
            rounds = asyncio.run(paired(url, model, args.next_round, make))
        if args.inside and lmcache:
            inside = asyncio.run(paired(url, model, args.inside, inside_prompts(vocab, 256, rng)))
    one = res[tails[0]]["alone_s"] if 1 in tails else None
    table = Table(title=f"cached TTFT ({args.config}), {args.blocks} blocks cached + tail")
    for col in ("tail recomputed", "alone p50", f"{args.prompts} at once p50", "at once / alone",
                "alone / 1-token tail"):  # fmt: skip
        table.add_column(col, justify="right")
    for tail, r in res.items():
        r["ratio_together"] = r["together_s"] / r["alone_s"]
        table.add_row(
            str(tail), f"{r['alone_s'] * 1000:.0f} ms", f"{r['together_s'] * 1000:.0f} ms",
            f"{r['ratio_together']:.2f}x", f"{r['alone_s'] / one:.2f}x" if one else "-",
        )  # fmt: skip
    if res:
        console.print(table)
    if rounds is not None:
        console.print(
            f"round 2 of a chat (median of {args.next_round}): round 1 stored whole "
            f"{rounds['whole_ttft_s'] * 1000:.0f} ms ({rounds['whole_loaded_tokens']:.0f} tokens "
            f"loaded), cut at its last full chunk {rounds['cut_ttft_s'] * 1000:.0f} ms "
            f"({rounds['cut_loaded_tokens']:.0f} loaded): {rounds['ratio']:.2f}x"
        )
    if inside is not None:
        console.print(
            f"prompts sharing another's first 3000 tokens (median of {args.inside}): through "
            f"the chunk they end inside {inside['whole_ttft_s'] * 1000:.0f} ms "
            f"({inside['whole_loaded_tokens']:.0f} tokens loaded), whole chunks only "
            f"{inside['cut_ttft_s'] * 1000:.0f} ms ({inside['cut_loaded_tokens']:.0f} loaded): "
            f"{inside['ratio']:.2f}x"
        )
    if args.json:
        figures = {"config": args.config, "tails": res, "next_round": rounds, "inside": inside}
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(tool_args.run_tool(main))
