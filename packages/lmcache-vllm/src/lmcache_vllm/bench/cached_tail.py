"""What a cached request still costs: TTFT against the tail the engine recomputes.

The library code of ``tools/bench_cached_tail.py`` (see there for the
scenarios): :func:`measure` sends prompts cut to whole blocks + ``tail``
tokens, one at a time and ``conc`` at a time, each after emptying vLLM's own
prefix cache when ``reset`` (so every hit is lmcache's); :func:`paired`
alternates a request after its stored prompt went in whole with the same
after it went in cut at its last full chunk (the control);
:func:`next_round_prompts` and :func:`inside_prompts` make those prompts.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Callable
from typing import Any

from lmcache_core.bench.client import BenchmarkFailed, stream_completion
from lmcache_core.bench.loadgen import Sample
from lmcache_core.bench.probes import reset_engine_prefix_cache
from lmcache_core.bench.scrape import scrape_metrics


async def _ttft(client: Any, url: str, model: str, ids: list[int]) -> float:
    """TTFT of one streamed request for ``ids`` (one token); raises with the server's reason."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "stream": True}
    sample = Sample(user=-1, round=0, start_s=0.0)
    await stream_completion(client, f"{url}/v1", body, sample)
    if sample.error:
        raise BenchmarkFailed(f"a request to {url} failed: {sample.error}")
    return sample.ttft_s


async def measure(
    url: str, model: str, bases: list[list[int]], tails: list[int], block: int, conc: int,
    repeats: int, reset: bool,
) -> dict[int, dict[str, float]]:  # fmt: skip
    """Per tail: median TTFT of the bases cut to whole blocks + ``tail`` tokens, one at a
    time and ``conc`` at a time (each base computed and stored once first)."""
    import httpx

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
