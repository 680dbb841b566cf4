"""A load generator for any OpenAI-compatible server: many users, long contexts, many rounds.

The workload of upstream LMCache's multi-round QA benchmark: ``users`` users,
each with a long context of their own (``context_words``) after an optional
shared system prompt, each holding a conversation of ``rounds`` rounds (every
round resends the whole history, the server's answers included), run with at
most ``concurrency`` requests in flight, or started at ``rate`` requests per
second (Poisson arrivals; a user's next round still waits for its answer).
Streaming gives time to first token (TTFT) and the gaps between later tokens
(inter-token latency, ITL) of every request.

It works against any server (vLLM alone, vLLM with lmcache, SGLang), so one
script measures every configuration the same way. ``httpx`` (async) is the
client (:func:`~lmcache_core.bench.client.stream_completion`): pip install
'lmcache-core[bench]'. A failed request carries the server's reason
(:func:`~lmcache_core.bench.client.require_ok` turns failures into an error).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lmcache_core.bench.client import stream_completion
from lmcache_core.bench.workload import synthetic_text
from lmcache_core.errors import ConfigError


@dataclass(frozen=True)
class LoadSpec:
    users: int = 12
    rounds: int = 4
    context_words: int = 2000
    system_words: int = 0
    question_words: int = 20
    answer_tokens: int = 32
    concurrency: int = 2
    rate: float | None = None  # requests per second; None: as concurrency allows
    seed: int = 0
    #: Run for this long: each user starts its conversation over (same context,
    #: a returning user) after its last round. None: ``rounds`` once per user.
    duration_s: float | None = None

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)} must be >= {low}"
            for name, low in (("users", 1), ("rounds", 1), ("concurrency", 1), ("answer_tokens", 1))
            if getattr(self, name) < low
        ]
        if self.rate is not None and not self.rate > 0:
            problems.append(f"rate={self.rate} must be > 0 requests per second")
        if self.duration_s is not None and not self.duration_s > 0:
            problems.append(f"duration_s={self.duration_s} must be > 0 seconds")
        if problems:
            raise ConfigError(problems, "lmcache bench serve")


@dataclass
class Sample:
    """One request: when it started (seconds into the run) and how it went."""

    user: int
    round: int
    start_s: float
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    error: str | None = None


class Conversation:
    """One user's history: system prompt, own context, then question/answer turns."""

    def __init__(self, spec: LoadSpec, user: int, system: str) -> None:
        self.spec = spec
        self.user = user
        context = synthetic_text(spec.seed * 100_003 + 17 * (user + 1), spec.context_words)
        self.history = (f"System: {system}\n" if system else "") + f"Document: {context}\n"

    def prompt(self, round_: int) -> str:
        q = synthetic_text(
            self.spec.seed + 7919 * (self.user + 1) + round_, self.spec.question_words
        )
        return f"{self.history}User: {q}\nAssistant:"

    def answered(self, round_: int, answer: str) -> None:
        self.history = f"{self.prompt(round_)}{answer}\n"


async def run_load(
    base_url: str,
    spec: LoadSpec,
    model: str | None = None,
    on_sample: Callable[[Sample], None] | None = None,
    timeout_s: float = 600,
) -> tuple[list[Sample], float, str]:
    """Run the workload; returns (samples, wall seconds, model)."""
    try:
        import httpx
    except ImportError:
        raise ConfigError(
            ["the load generator needs httpx: pip install 'lmcache-core[bench]' (or httpx)"],
            "lmcache bench serve",
        ) from None
    root = base_url.rstrip("/")
    api = root if root.endswith("/v1") else f"{root}/v1"
    limits = httpx.Limits(max_connections=spec.concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        if model is None:
            listed = (await client.get(f"{api}/models")).json().get("data", [])
            if not listed:
                raise ConfigError([f"{base_url} serves no models"], "lmcache bench serve")
            model = str(listed[0]["id"])
        system = synthetic_text(spec.seed, spec.system_words) if spec.system_words else ""
        users = [Conversation(spec, u, system) for u in range(spec.users)]
        slots = asyncio.Semaphore(spec.concurrency)
        arrivals = random.Random(spec.seed)
        clock = {"next": 0.0}
        samples: list[Sample] = []
        t_run = time.perf_counter()

        async def admit() -> None:
            if spec.rate is None:
                return
            clock["next"] += arrivals.expovariate(spec.rate)
            delay = clock["next"] - (time.perf_counter() - t_run)
            if delay > 0:
                await asyncio.sleep(delay)

        def over() -> bool:
            return spec.duration_s is not None and time.perf_counter() - t_run >= spec.duration_s

        async def user_loop(conv: Conversation) -> None:
            while True:
                for r in range(spec.rounds):
                    await admit()
                    if over():
                        return
                    async with slots:
                        sample = Sample(conv.user, r, time.perf_counter() - t_run)
                        body = {
                            "model": model,
                            "prompt": conv.prompt(r),
                            "max_tokens": spec.answer_tokens,
                            "temperature": 0,
                            "stream": True,
                            "stream_options": {"include_usage": True},
                        }
                        try:
                            answer = await stream_completion(client, api, body, sample)
                        except (httpx.HTTPError, json.JSONDecodeError) as e:
                            sample.error, answer = f"{type(e).__name__}: {e}", ""
                    samples.append(sample)
                    if on_sample is not None:
                        on_sample(sample)
                    if sample.error:
                        return  # the rest of this conversation would not be the same workload
                    conv.answered(r, answer)
                if spec.duration_s is None or over():
                    return
                conv = Conversation(spec, conv.user, system)  # the user comes back

        await asyncio.gather(*(user_loop(c) for c in users))
        return samples, time.perf_counter() - t_run, model


def percentiles(values: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ..., "mean": ...}`` (linear interpolation)."""
    if not values:
        return {f"p{p}": float("nan") for p in ps} | {"mean": float("nan")}
    v = sorted(values)
    out = {}
    for p in ps:
        k = (len(v) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(v) - 1)
        out[f"p{p}"] = v[lo] + (v[hi] - v[lo]) * (k - lo)
    out["mean"] = statistics.fmean(v)
    return out


def summarize(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    prompt = sum(s.prompt_tokens or 0 for s in ok)
    output = sum(s.output_tokens for s in ok)
    rounds = sorted({s.round for s in samples})
    return {
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "duration_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s else 0.0,
        "input_token_throughput": prompt / wall_s if wall_s else 0.0,
        "output_token_throughput": output / wall_s if wall_s else 0.0,
        "ttft_s": percentiles([s.ttft_s for s in ok]),
        "itl_s": percentiles([x for s in ok for x in s.itl_s]),
        "e2e_s": percentiles([s.e2e_s for s in ok]),
        "rounds": [
            {
                "round": r + 1,
                "requests": sum(1 for s in ok if s.round == r),
                "errors": sum(1 for s in samples if s.round == r and s.error),
                "median_ttft_s": statistics.median([s.ttft_s for s in ok if s.round == r] or [0]),
                "mean_prompt_tokens": statistics.fmean(
                    [s.prompt_tokens for s in ok if s.round == r and s.prompt_tokens] or [0]
                ),
            }
            for r in rounds
        ],
    }


def hit_rate(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Hit rates over the run from two scrapes of a ``/metrics`` page (lmcache's, vLLM's)."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    out = {}
    if delta("lmcache:num_lookup_tokens") > 0:
        out["lmcache"] = delta("lmcache:num_lookup_hits") / delta("lmcache:num_lookup_tokens")
    if delta("vllm:prefix_cache_queries") > 0:
        out["vllm_prefix_cache"] = delta("vllm:prefix_cache_hits") / delta(
            "vllm:prefix_cache_queries"
        )
    if delta("vllm:external_prefix_cache_queries") > 0:
        out["vllm_external"] = delta("vllm:external_prefix_cache_hits") / delta(
            "vllm:external_prefix_cache_queries"
        )
    return out


def samples_json(samples: list[Sample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in sorted(samples, key=lambda s: s.start_s)]
