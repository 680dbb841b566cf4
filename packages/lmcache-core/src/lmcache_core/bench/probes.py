"""Single-request baselines measured beside a load run: the ideal throughput, cached TTFT.

A load run's throughput alone says little: is 0.34 requests/s good? Issue 16
judges it against an *ideal*: every user's first round a plain prefill, every
later round a cache hit at the single-request cached time, one request after
another. ``single_request_times`` measures those times on the same server in
the same run (fresh users, one request in flight), ``ideal`` turns them into
the throughput a perfect cache would give the workload, and the load run is
reported as a fraction of it.

``cached_ttft_under_concurrency`` answers the other question a serving
engineer asks: with everything cached, how much does concurrency stretch the
time to first token? It stores a few long prompts, then sends them one at a
time and ``concurrency`` at a time, alternating so the machine's drift
cancels, and reports the ratio of the medians.

A repeat that the engine's own prefix cache still holds never reaches the
connector. Where the server allows it (vLLM started with
``VLLM_SERVER_DEV_MODE=1``: ``POST /reset_prefix_cache``) every cached
request here follows a reset of the engine's prefix cache, so the hit
measured is the connector's; elsewhere the result says it was not reset.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from lmcache_core.bench.client import BenchmarkFailed, stream_completion
from lmcache_core.bench.loadgen import Conversation, LoadSpec, Sample

#: Users numbered from here are the probes': contexts no load run has sent.
PROBE_USER_BASE = 1_000_000


async def reset_engine_prefix_cache(client: Any, root: str, tries: int = 20) -> bool:
    """Empty the engine's own prefix cache (not the connector's); False if it cannot."""
    for _ in range(tries):
        resp = await client.post(f"{root}/reset_prefix_cache")
        if resp.status_code != 200:
            return False  # not a vLLM dev-mode server: nothing to reset with
        if resp.json().get("success"):
            return True
        await asyncio.sleep(0.25)  # blocks still held by a finishing request
    return False


def _root_and_api(base_url: str) -> tuple[str, str]:
    root = base_url.rstrip("/").removesuffix("/v1")
    return root, f"{root}/v1"


async def _one(
    client: Any, api: str, model: str, prompt: str, max_tokens: int
) -> tuple[Sample, str]:
    """One streamed request alone: its timings and its text; raises if it failed."""
    sample = Sample(user=-1, round=0, start_s=0.0)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text = await stream_completion(client, api, body, sample)
    if sample.error:
        raise BenchmarkFailed(f"probe request to {api} failed: {sample.error}")
    return sample, text


async def _model(client: Any, api: str) -> str:
    return str((await client.get(f"{api}/models")).json()["data"][0]["id"])


async def single_request_times(
    base_url: str, spec: LoadSpec, probes: int = 2, model: str | None = None
) -> dict[str, Any]:
    """Per round, the median time of a request alone: round 1 uncached, later rounds cached.

    ``probes`` fresh users (contexts no load run has sent) hold the same
    conversation as the workload's users, one request in flight; before every
    later round the engine's own prefix cache is reset, so that round is served
    by the connector (or recomputed, without one).
    """
    import httpx

    root, api = _root_and_api(base_url)
    per_round: list[list[Sample]] = [[] for _ in range(spec.rounds)]
    reset_ok = True
    async with httpx.AsyncClient(timeout=600) as client:
        model = model or await _model(client, api)
        for p in range(probes):
            conv = Conversation(spec, PROBE_USER_BASE + p, "")
            for r in range(spec.rounds):
                if r:
                    reset_ok &= await reset_engine_prefix_cache(client, root)
                s, text = await _one(client, api, model, conv.prompt(r), spec.answer_tokens)
                per_round[r].append(s)
                conv.answered(r, text)
    return {
        "probes": probes,
        "engine_prefix_cache_reset": reset_ok,
        "rounds": [
            {
                "round": r + 1,
                "e2e_s": statistics.median(s.e2e_s for s in samples),
                "ttft_s": statistics.median(s.ttft_s for s in samples),
                "prompt_tokens": statistics.median(s.prompt_tokens or 0 for s in samples),
            }
            for r, samples in enumerate(per_round)
        ],
    }


def ideal(spec: LoadSpec, times: dict[str, Any]) -> dict[str, float]:
    """The workload done one request at a time at the single-request times."""
    duration = spec.users * sum(r["e2e_s"] for r in times["rounds"])
    return {
        "duration_s": duration,
        "request_throughput": spec.users * spec.rounds / duration,
    }


async def cached_ttft_under_concurrency(
    base_url: str,
    context_words: int = 3650,
    prompts: int = 8,
    concurrency: int = 4,
    passes: int = 2,
    model: str | None = None,
    reset: bool = True,
) -> dict[str, Any]:
    """TTFT of cached long prompts sent ``concurrency`` at a time vs one at a time.

    The prompts are stored first (one uncached request each); then, ``passes``
    times, all of them one at a time and all of them ``concurrency`` at a time,
    the engine's prefix cache reset before each, so every TTFT here is a
    connector hit. Returns both medians and their ratio. ``reset=False``
    measures the engine's own prefix cache instead (the baseline: vLLM
    alone, with KV memory for all the prompts).
    """
    import httpx

    root, api = _root_and_api(base_url)
    spec = LoadSpec(users=prompts, rounds=1, context_words=context_words, seed=7_777)
    texts = [Conversation(spec, PROBE_USER_BASE + u, "").prompt(0) for u in range(prompts)]
    single: list[Sample] = []
    together: list[Sample] = []
    reset_ok = True
    async with httpx.AsyncClient(
        timeout=600, limits=httpx.Limits(max_connections=concurrency + 2)
    ) as client:
        model = model or await _model(client, api)
        stored = [(await _one(client, api, model, t, 1))[0] for t in texts]
        slots = asyncio.Semaphore(concurrency)

        async def bounded(text: str) -> Sample:
            async with slots:
                return (await _one(client, api, model, text, 1))[0]

        for _ in range(passes):
            for text in texts:
                if reset:
                    reset_ok &= await reset_engine_prefix_cache(client, root)
                single.append((await _one(client, api, model, text, 1))[0])
            if reset:
                reset_ok &= await reset_engine_prefix_cache(client, root)
            together += await asyncio.gather(*(bounded(t) for t in texts))
    single_p50 = statistics.median(s.ttft_s for s in single)
    together_p50 = statistics.median(s.ttft_s for s in together)
    return {
        "prompts": prompts,
        "concurrency": concurrency,
        "prompt_tokens": statistics.median(s.prompt_tokens or 0 for s in stored),
        "uncached_ttft_s": statistics.median(s.ttft_s for s in stored),
        "single_ttft_p50_s": single_p50,
        "concurrent_ttft_p50_s": together_p50,
        "concurrent_ttft_max_s": max(s.ttft_s for s in together),
        "ratio": together_p50 / single_p50,
        "engine_prefix_cache_reset": reset and reset_ok,
    }
