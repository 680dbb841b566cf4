"""Non-prefix reuse (blending) in real vLLM: answer quality, TTFT, and the cost for others.

The library code of ``tools/bench_blend.py``; each measurement against its
baseline in the same process (vLLM's offline API, :class:`Bench`):

* :func:`quality`: a synthetic multi-document QA set
  (:mod:`lmcache_vllm.testing.qa_sets`). The documents are first stored in
  another order (or each on its own, ``warm="alone"``), then asked about in a
  new order. Greedy answers from a full prefill, from a blend at the
  configured ratio and from a blend at ratio 0 (re-rotation only) are scored
  against the ground truth, and the blends' answers against the full
  prefill's; the KL divergence of the first answer token's distribution from
  the full prefill's measures what greedy answers hide;
* :func:`speed`: 4 cached documents of about 1000 tokens in a new order and a
  short question: TTFT of the blend against a full prefill of the same prompt
  (a fresh cache salt makes it a miss), alternating;
* :func:`overhead`: uncached requests with blending on against blending off,
  alternating in one engine (the scheduler's blending is switched per
  request, so both paths store what they would).

vLLM runs in this process: set ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (so the
connector's objects are reachable) before vLLM is imported, as the driver does.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

from lmcache_core.bench.paired import spread

from lmcache_vllm.testing import qa_sets as qa


def answer(text: str) -> str:
    """A completion's answer: up to the first period or line break, lowercased."""
    return text.strip().split("\n")[0].split(".")[0].strip().lower()


class Bench:
    """One vLLM ``LLM`` with lmcache and blending on, and the connector's objects to steer."""

    def __init__(
        self,
        model: str,
        ratios: tuple[float, ...],
        checks: tuple[int, ...],
        dtype: str = "float32",
    ) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(
            model=model,
            enforce_eager=True,
            max_model_len=8192,
            dtype=dtype,
            seed=0,
            max_num_batched_tokens=8192,
            enable_prefix_caching=False,
            kv_transfer_config={
                "kv_connector": "LMCacheKVConnector",
                "kv_role": "kv_both",
                "kv_connector_module_path": "lmcache_vllm",
                "kv_connector_extra_config": {
                    "enable_blending": True,
                    "blend_recompute_ratios": list(ratios),
                    "blend_check_layers": list(checks),
                    "blend_min_tokens": 32,
                },
            },
        )
        from lmcache_vllm.connector import SCHEDULERS, WORKERS

        (self.worker,) = WORKERS
        (self.sched,) = SCHEDULERS
        # Steady state: the DRAM tier's pages resident, as after the first minutes of
        # serving. First-touch page faults would otherwise land on whichever mode
        # stores into a slot first.
        self.worker.engine.pool.arena.prefault()
        self.blend_sched = self.sched.blend
        self.ratios = ratios
        self.sp = SamplingParams(max_tokens=8, temperature=0, logprobs=20)
        self.sp1 = SamplingParams(max_tokens=1, temperature=0)
        self.salt = 0

    def gen(self, prompt: str, *, fresh: bool = False, ratio: float | None = None, one=False):
        # ratio: every check layer's (0: re-rotation only); None: the configured ones
        self.worker.blend.ratios = self.ratios if ratio is None else (ratio,) * len(self.ratios)
        p: dict = {"prompt": prompt}
        if fresh:  # a salt no request used before: every lookup misses
            self.salt += 1
            p["cache_salt"] = f"fresh-{self.salt}"
        t = time.perf_counter()
        out = self.llm.generate(p, self.sp1 if one else self.sp, use_tqdm=False)[0]
        took = time.perf_counter() - t
        o = out.outputs[0]
        if o.logprobs:  # the first generated token's distribution (top 20)
            self.first = {tok: lp.logprob for tok, lp in o.logprobs[0].items()}
        return o.text, took, len(out.prompt_token_ids)

    def counters(self) -> dict:
        m = self.worker.engine.metrics
        return {
            k: m.get(f"lmcache:{k}")
            for k in ("blend_requests", "blend_reused_tokens", "blend_recomputed_tokens")
        }


def kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(p || q) over p's top tokens, both renormalized there (so never negative); a
    token q lacks gets q's lowest logprob."""
    floor = min(q.values())
    qs = {t: q.get(t, floor) for t in p}
    zp = math.log(sum(math.exp(v) for v in p.values()))
    zq = math.log(sum(math.exp(v) for v in qs.values()))
    return max(0.0, sum(math.exp(lp - zp) * ((lp - zp) - (qs[t] - zq)) for t, lp in p.items()))


def quality(
    b: Bench,
    n_items: int,
    warm: str,
    qa_set: str = "facts",
    progress: Callable[[int], Callable[[], None]] | None = None,
) -> dict:
    """Accuracy and agreement with a full prefill of blends at the configured ratios and at
    ratio 0, on ``n_items`` items. ``progress(total)`` returns a per-item callback."""
    if qa_set == "linked":  # answers that need two passages read together
        items = qa.make_linked_items(n_items, doc_tokens=60, seed=11)
    else:
        items = qa.make_items(n_items, doc_tokens=80, seed=11)
    rows = []
    advance = progress(len(items)) if progress is not None else (lambda: None)
    for it in items:
        if warm == "alone":
            for d in it["docs"]:
                b.gen(d + qa.SEPARATOR + "Summary:")
        else:
            b.gen(qa.warm_prompt(it))
        prompt = qa.render(it)
        full, _, _ = b.gen(prompt, fresh=True)
        p_full = b.first
        blend, _, _ = b.gen(prompt)
        kl_blend = kl(p_full, b.first)
        zero, _, _ = b.gen(prompt, ratio=0.0)
        rows.append((it, full, blend, zero, kl_blend, kl(p_full, b.first)))
        advance()
    n = len(rows)

    def acc(i: int) -> float:
        return sum(qa.is_correct(r[0], r[i]) for r in rows) / n

    def agree(i: int) -> float:
        return sum(answer(r[i]) == answer(r[1]) for r in rows) / n

    return {
        "items": n,
        "set": qa_set,
        "warm": warm,
        "accuracy": {"full": acc(1), "blend": acc(2), "ratio0": acc(3)},
        "agreement_with_full": {"blend": agree(2), "ratio0": agree(3)},
        # How far the first answer token's distribution is from the full prefill's:
        # finer than greedy answers, which flip only past a margin.
        "first_token_kl": {
            "blend": statistics.mean(r[4] for r in rows),
            "ratio0": statistics.mean(r[5] for r in rows),
        },
    }


def speed(b: Bench, trials: int, say: Callable[[str], None] = print) -> dict:
    """TTFT of a blend of 4 cached ~1000-token documents in a new order against a full
    prefill of the same prompt (a fresh cache salt), per trial."""
    items = qa.make_items(trials, docs=(4, 4), doc_tokens=1000, seed=21)
    full_t, blend_t, ntok = [], [], []
    b.gen(qa.render(items[0]), fresh=True, one=True)  # warm-up
    for it in items:
        b.gen(qa.warm_prompt(it), one=True)  # stores the 4 documents
        prompt = qa.render(it)
        before = b.counters()
        _, tb, n = b.gen(prompt, one=True)
        after = b.counters()
        _, tf, _ = b.gen(prompt, fresh=True, one=True)
        blend_t.append(tb)
        full_t.append(tf)
        ntok.append(n)
        reused = after["blend_reused_tokens"] - before["blend_reused_tokens"]
        say(f"  {n} tokens, {reused:.0f} reused: blend {tb:.2f} s, full {tf:.2f} s")
    return {
        "prompt_tokens": statistics.median(ntok),
        "full_ttft_s": statistics.median(full_t),
        "blend_ttft_s": statistics.median(blend_t),
        "ratio": statistics.median(blend_t) / statistics.median(full_t),
        "paired_ratio": spread([x / y for x, y in zip(blend_t, full_t)]).as_dict(),
    }


def overhead(b: Bench, trials: int) -> dict:
    """Uncached requests, blending on vs off, alternating (the order flips each round)."""
    items = qa.make_items(trials, docs=(4, 4), doc_tokens=500, seed=31)
    on, off = [], []
    b.gen(qa.render(items[0]), fresh=True, one=True)  # warm-up
    for i, it in enumerate(items):
        prompt = qa.render(it)
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            b.sched.blend = b.blend_sched if mode == "on" else None
            _, t, _ = b.gen(prompt, fresh=True, one=True)
            (on if mode == "on" else off).append(t)
    b.sched.blend = b.blend_sched
    # Each pair ran the same prompt back to back: their ratio is immune to the machine's
    # drift from minute to minute, which is larger than the effect measured.
    pairs = [x / y for x, y in zip(on, off)]
    return {
        "on_ttft_s": statistics.median(on),
        "off_ttft_s": statistics.median(off),
        "pairs": len(pairs),
        "ratio": statistics.median(pairs),
        "paired_ratio": spread(pairs).as_dict(),
    }
