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
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def _ttft(client, url: str, model: str, ids: list[int]) -> float:  # type: ignore[no-untyped-def]
    body = {"model": model, "prompt": ids, "max_tokens": 1, "stream": True}
    t0 = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                if '"error"' in line:
                    raise RuntimeError(line[:300])
                return time.perf_counter() - t0
    raise RuntimeError(f"no token from {url} (HTTP {resp.status_code})")


async def measure(
    url: str, model: str, bases: list[list[int]], tails: list[int], block: int, conc: int,
    repeats: int, reset: bool,
) -> dict[int, dict[str, float]]:  # fmt: skip
    import httpx
    from lmcache_core.load_probes import reset_engine_prefix_cache

    full = len(bases[0]) - block  # whole blocks; the base's last block holds the tails
    out: dict[int, dict[str, float]] = {}
    async with httpx.AsyncClient(timeout=600) as client:
        for ids in bases:  # compute and store every base once (all of its blocks)
            await _ttft(client, url, model, ids)
        for tail in tails:
            alone: list[float] = []
            together: list[float] = []
            for _ in range(repeats):
                for ids in bases[:conc]:
                    if reset:
                        await reset_engine_prefix_cache(client, url)
                    alone.append(await _ttft(client, url, model, ids[: full + tail]))
                if reset:
                    await reset_engine_prefix_cache(client, url)
                together += await asyncio.gather(
                    *(_ttft(client, url, model, ids[: full + tail]) for ids in bases[:conc])
                )
            out[tail] = {
                "alone_s": statistics.median(alone),
                "together_s": statistics.median(together),
            }
    return out


async def paired(
    url: str, model: str, pairs: int, make: Callable[[], tuple[list[int], list[int], list[int]]]
) -> dict[str, float]:
    """TTFT of a request after its stored prompt went in whole or cut at its last full
    chunk (the control), alternating; ``make()`` gives (stored, cut, request)."""
    import httpx
    from lmcache_core.load_probes import reset_engine_prefix_cache
    from lmcache_core.workload import scrape_metrics

    def external() -> float:
        return scrape_metrics(f"{url}/metrics", prefix="").get(
            "vllm:external_prefix_cache_hits", 0.0
        )

    times: dict[str, list[float]] = {"whole": [], "cut": []}
    loaded: dict[str, float] = {"whole": 0.0, "cut": 0.0}
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(2 * pairs):
            kind = ("whole", "cut")[i % 2]
            stored, cut, request = make()
            await _ttft(client, url, model, stored if kind == "whole" else cut)
            await reset_engine_prefix_cache(client, url)
            before = external()
            times[kind].append(await _ttft(client, url, model, request))
            loaded[kind] += external() - before
    out = {f"{k}_ttft_s": statistics.median(v) for k, v in times.items()}
    out |= {f"{k}_loaded_tokens": loaded[k] / pairs for k in loaded}
    out["ratio"] = out["whole_ttft_s"] / out["cut_ttft_s"]
    return out


def next_round_prompts(vocab: int, chunk: int, block: int, rng: random.Random) -> Callable:
    """Round 2 of a chat, its round 1 stored whole (tail chunk included) or cut at its
    last full chunk (the control: what lmcache loaded before it found stored tails)."""
    full = (4096 - 100 - block) // chunk * chunk  # round 1: full chunks + one block

    def make() -> tuple[list[int], list[int], list[int]]:
        round1 = [rng.randrange(10, vocab) for _ in range(full + block)]
        return round1, round1[:full], round1 + [rng.randrange(10, vocab) for _ in range(100)]

    return make


def inside_prompts(vocab: int, chunk: int, rng: random.Random) -> Callable:
    """vLLM's prefix_repetition request: another prompt's first 3000 tokens, then 100 new.
    The stored prompt (3000 + 100 others) holds tokens 2816-2999 inside its chunk 11;
    the control stores it cut at 2816, so only whole chunks can load (upstream's reuse)."""
    full = 3000 // chunk * chunk

    def make() -> tuple[list[int], list[int], list[int]]:
        prefix = [rng.randrange(10, vocab) for _ in range(3000)]
        stored = prefix + [rng.randrange(10, vocab) for _ in range(100)]
        return stored, prefix[:full], prefix + [rng.randrange(10, vocab) for _ in range(100)]

    return make


def main() -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_vllm import default_dtype
    from lmcache_vllm.testing import vllm_server
    from make_test_model import ensure_model
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", choices=["vllm", "lmcache"], default="vllm")
    ap.add_argument("--model", help="default: the local random ~200M Llama (32 KiB KV/token)")
    ap.add_argument("--dtype", help="default: bfloat16 where the CPU has AVX512-BF16/AMX")
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
    model = args.model or str(
        ensure_model(ROOT / ".cache" / "models" / "llama-200m", preset="bench")
    )
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    n = (args.blocks + 1) * args.block_size
    bases = [[rng.randrange(10, vocab) for _ in range(n)] for _ in range(args.prompts)]
    tails = [int(t) for t in args.tails.split(",") if t]
    if not all(1 <= t < args.block_size for t in tails):
        ap.error(f"--tails must lie in [1, {args.block_size - 1}]")
    lmcache = args.config == "lmcache"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1" if os.cpu_count() == 2 else "all",
        "VLLM_SERVER_DEV_MODE": "1",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "4GiB",
    }
    server_args = ["--enable-prefix-caching", "--max-num-batched-tokens", "4096"]
    server_args += ["--block-size", str(args.block_size)]
    log = Path(tempfile.mkdtemp(prefix="lmcache-tail-")) / "vllm.log"
    dtype = args.dtype or default_dtype()
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
    sys.exit(main())
