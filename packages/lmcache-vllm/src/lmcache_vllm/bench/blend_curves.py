"""Blend quality and TTFT over the recompute budget, per selection policy and QA set.

The library code of ``tools/bench_blend.py --only curves``. For every item of
every set, in one vLLM engine (:class:`~lmcache_vllm.bench.blend.Bench`):
the documents are stored in another order, a full prefill of the asked
prompt is the reference, and each (policy, budget) blends the same prompt.
Each point is scored against the full prefill (greedy answers the same,
first-token KL) and the ground truth (accuracy). Ratio 0 (re-rotation
only) and ratio 1 (every token recomputed) do not depend on the policy and
run once per item.

TTFT per (policy, budget) is measured on long prompts (4 documents of about
500 tokens) against a full prefill of the same prompt, in the same minute.

A *policy* here is a selection (``blend_selection``), its check layers and
a budget rule: a fixed ratio at the last check layer (gradual filtering
keeps 3x and 2x that at the layers before), or an adaptive budget with a
deviation target (its points sit at the share it chose, on average).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache_core.bench import svg
from lmcache_core.blend.selection import SelectionPolicy, parse_selection

from lmcache_vllm.bench.blend import Bench, answer, kl
from lmcache_vllm.testing import qa_sets as qa

BUDGETS = (0.05, 0.1, 0.15, 0.3, 0.5, 0.7)
#: Deviation targets of the adaptive budget (one point each).
TARGETS = (4e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5)


@dataclass(frozen=True)
class Policy:
    """One curve: a selection, its check layers, fixed or adaptive."""

    name: str
    selection: str = "k_deviation"
    checks: tuple[int, ...] = (1,)
    adaptive: bool = False
    cap: float = 1.0

    def settings(self, x: float) -> tuple[SelectionPolicy, tuple[int, ...], tuple[float, ...]]:
        """(policy, check layers, ratios) at budget ``x`` (adaptive: the target ``x``)."""
        sel = SelectionPolicy(rankings=parse_selection(self.selection))
        if self.adaptive:
            pol = dataclasses.replace(sel, budget="adaptive", target=x, floor=0.0, cap=self.cap)
            return pol, self.checks, (1.0,) * len(self.checks)
        # Gradual filtering: each earlier check layer keeps more (3x, 2x the last's share).
        n = len(self.checks)
        ratios = tuple(min(1.0, x * (n - i)) for i in range(n))
        return sel, self.checks, ratios


POLICIES = {
    p.name: p
    for p in (
        Policy("k_deviation"),
        Policy("v_deviation", "v_deviation"),
        Policy("segment_starts", "segment_starts"),
        Policy("question_attention", "question_attention"),
        Policy("k+segment_starts", "k_deviation+segment_starts"),
        Policy("k+question", "k_deviation+question_attention"),
        Policy("gradual k 1-2-3", checks=(1, 2, 3)),
        Policy("random", "random"),
        Policy("adaptive k", adaptive=True),
        Policy("adaptive k+question", "k_deviation+question_attention", adaptive=True),
        Policy("adaptive k+segment_starts", "k_deviation+segment_starts", adaptive=True),
    )
}


def _configure(b: Bench, policy: SelectionPolicy, checks: tuple[int, ...], ratios) -> None:
    w = b.worker.blend
    w.policy, w.check_layers, w.ratios = policy, checks, ratios
    b.sched.blend.wants_question = policy.needs_question
    b.ratios = ratios  # Bench.gen sets the worker's ratios from these


def _store(b: Bench, prompt: str) -> None:
    """The documents in another order: what stores them (little of it is cached yet)."""
    _configure(b, SelectionPolicy(), (1,), (0.15,))
    b.gen(prompt, one=True)


def _blend(b: Bench, prompt: str, policy: Policy | None, x: float, one: bool = False):
    """Generate with the blend at ``x`` (policy None: ratio x with K deviation), returning
    (text, seconds, recomputed share of the blend range)."""
    if policy is None:
        _configure(b, SelectionPolicy(), (1,), (x,))
    else:
        _configure(b, *policy.settings(x))
    b.worker.blend.last = None
    text, took, _ = b.gen(prompt, one=one)
    last = b.worker.blend.last
    if last is None:  # not blended (a refusal would show here, not as a wrong point)
        raise RuntimeError("the request was not blended: the bench measures nothing")
    b.deviation = (last.deviation, last.residual)
    return text, took, last.recomputed / max(1, last.recomputed + last.reused)


def _runs(
    policies: Sequence[str], budgets: Sequence[float], targets: Sequence[float]
) -> list[tuple[str, Policy | None, float]]:
    """What one item runs: ratios 0 and 1 once, then each policy at each budget (target)."""
    runs: list[tuple[str, Policy | None, float]] = [("ratio", None, 0.0), ("ratio", None, 1.0)]
    for name in policies:
        pol = POLICIES[name]
        runs += [(name, pol, x) for x in (targets if pol.adaptive else budgets)]
    return runs


def quality_curves(
    b: Bench,
    sets: Sequence[str],
    n_items: int,
    seed: int,
    policies: Sequence[str],
    budgets: Sequence[float] = BUDGETS,
    targets: Sequence[float] = TARGETS,
    advance: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Per set: agreement, accuracy and first-token KL per (policy, budget)."""
    out: dict[str, Any] = {}
    for set_name in sets:
        items = qa.make_set(set_name, n_items, seed=seed)
        # (policy, x) -> list of (same answer, correct, kl, recomputed share)
        # (policy, x) -> per item (same answer, correct, KL, recomputed, deviation, left)
        points: dict[tuple[str, float], list[tuple[bool, bool, float, float, float, float]]] = {}
        full_correct = []
        for it in items:
            _store(b, qa.warm_prompt(it))
            prompt = qa.render(it)
            full, _, _ = b.gen(prompt, fresh=True)
            p_full = b.first
            full_correct.append(qa.is_correct(it, full))
            for name, pol, x in _runs(policies, budgets, targets):
                text, _, share = _blend(b, prompt, pol, x)
                same = answer(text) == answer(full)
                row = (same, qa.is_correct(it, text), kl(p_full, b.first), share, *b.deviation)
                points.setdefault((name, x), []).append(row)
            advance()
        n = len(items)
        rows = []
        for (name, x), r in points.items():
            rows.append(
                {
                    "policy": name,
                    "x": x,
                    "agreement": sum(x[0] for x in r) / n,
                    "accuracy": sum(x[1] for x in r) / n,
                    "kl": statistics.mean(x[2] for x in r),
                    "recomputed": statistics.mean(x[3] for x in r),
                    "deviation": statistics.mean(x[4] for x in r),
                    "left": statistics.mean(x[5] for x in r),
                    "agree_by_item": [x[0] for x in r],
                }
            )
        out[set_name] = {"items": n, "full_accuracy": sum(full_correct) / n, "points": rows}
    return out


def ttft_curves(
    b: Bench,
    policies: Sequence[str],
    trials: int,
    budgets: Sequence[float] = BUDGETS,
    targets: Sequence[float] = TARGETS,
    advance: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """TTFT of each (policy, budget) over a full prefill of the same long prompt."""
    items = qa.make_items(trials, docs=(4, 4), doc_tokens=500, seed=41)
    b.gen(qa.render(items[0]), fresh=True, one=True)  # warm-up
    ratios: dict[tuple[str, float], list[float]] = {}
    shares: dict[tuple[str, float], list[float]] = {}
    for it in items:
        _store(b, qa.warm_prompt(it))
        prompt = qa.render(it)
        _, t_full, _ = b.gen(prompt, fresh=True, one=True)
        for name, pol, x in _runs(policies, budgets, targets):
            _, t, share = _blend(b, prompt, pol, x, one=True)
            ratios.setdefault((name, x), []).append(t / t_full)
            shares.setdefault((name, x), []).append(share)
        advance()
    return [
        {
            "policy": name,
            "x": x,
            "ttft_vs_full": statistics.median(r),
            "recomputed": statistics.mean(shares[(name, x)]),
        }
        for (name, x), r in ratios.items()
    ]


# ---------------------------------------------------------------------------- the plot


def write_curves_svg(path: Path, quality: dict[str, Any]) -> None:
    """One panel per set: agreement with the full prefill over the share recomputed."""
    sets = list(quality)
    pw, ph, left, bottom, top = 330, 260, 50, 40, 30
    legend_w = 200
    w, h = left + pw * len(sets) + legend_w, ph + top + bottom
    names: list[str] = []
    for s in sets:
        for p in quality[s]["points"]:
            if p["policy"] != "ratio" and p["policy"] not in names:
                names.append(p["policy"])
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
    ]
    for si, s in enumerate(sets):
        x0 = left + si * pw
        x1 = x0 + pw - 30

        def sx(v: float, x0: float = x0, x1: float = x1) -> float:
            return x0 + (x1 - x0) * v

        def sy(v: float) -> float:
            return top + ph - ph * v

        q = quality[s]
        out += [
            f'<text x="{x0}" y="{top - 10}">{svg.escape(s)} ({q["items"]} items, full prefill '
            f"{q['full_accuracy']:.0%} correct)</text>",
            f'<line x1="{x0}" y1="{sy(0)}" x2="{x1}" y2="{sy(0)}" stroke="black"/>',
            f'<line x1="{x0}" y1="{sy(0)}" x2="{x0}" y2="{sy(1)}" stroke="black"/>',
            f'<line x1="{x0}" y1="{sy(0.9)}" x2="{x1}" y2="{sy(0.9)}" stroke="#aaa" '
            'stroke-dasharray="4 3"/>',
            f'<text x="{x0 - 30}" y="{sy(0.9) + 4}">90%</text>',
            f'<text x="{x0 + 40}" y="{h - 8}">share of tokens recomputed</text>',
        ]
        base = {p["x"]: p for p in q["points"] if p["policy"] == "ratio"}
        for ni, name in enumerate(names):
            pts = sorted(
                (p["recomputed"], p["agreement"]) for p in q["points"] if p["policy"] == name
            )
            if 0.0 in base:
                pts = [(base[0.0]["recomputed"], base[0.0]["agreement"]), *pts]
            if 1.0 in base:
                pts.append((base[1.0]["recomputed"], base[1.0]["agreement"]))
            color = svg.color(ni)
            line = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts if math.isfinite(a))
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}"/>')
            for a, b_ in pts:
                if math.isfinite(a):
                    out.append(f'<circle cx="{sx(a):.1f}" cy="{sy(b_):.1f}" r="2" fill="{color}"/>')
    for ni, name in enumerate(names):
        ly = top + 16 * ni
        lx = left + pw * len(sets)
        color = svg.color(ni)
        out.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly + 9}">{svg.escape(name)}</text>')
    out.append('<text x="8" y="14">answers equal to the full prefill\'s (0 to 100%)</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))
