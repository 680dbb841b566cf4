"""Choosing the tokens a blend recomputes.

CacheBlend's observation: a token's cached KV was computed without the
segments that now stand before it, and the tokens whose KV that changes most
are few. At a check layer the blend pass has computed every token's KV
afresh; the tokens whose fresh K deviates most from the cached (re-rotated)
K are recomputed in every later layer, all others keep their cached KV.

Tokens with no cached KV (holes) are always recomputed; the ratio counts the
*cached* tokens only, so ratio 0 is pure reuse and ratio 1 a full prefill.
With several check layers (the paper's gradual filtering) each keeps a share
of the tokens the one before kept: ratios must not grow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def num_selected(num_cached: int, ratio: float) -> int:
    """How many cached tokens a ratio recomputes (rounded to nearest, so 1.0 is all)."""
    return min(num_cached, round(num_cached * ratio))


def select_tokens(
    scores: np.ndarray, cached: np.ndarray, active: np.ndarray, ratio: float
) -> np.ndarray:
    """Sorted indices to keep computing after a check layer.

    ``scores[i]``: how far token ``i``'s fresh K is from its cached one (any
    non-negative measure; NaN counts as the largest). ``cached[i]``: whether
    it has cached KV. ``active``: the sorted indices computed so far; the
    result is a subset. Holes in ``active`` are always kept; of its cached
    tokens, ``num_selected(cached.sum(), ratio)`` with the highest scores
    (ties to the earlier token).
    """
    scores = np.asarray(scores, dtype=np.float64)
    cached = np.asarray(cached, dtype=bool)
    active = np.asarray(active, dtype=np.int64)
    holes = active[~cached[active]]
    candidates = active[cached[active]]
    k = min(len(candidates), num_selected(int(cached.sum()), ratio))
    if k <= 0:
        return holes
    s = np.nan_to_num(scores[candidates], nan=np.inf)
    # Stable sort on -score keeps the earlier token first among ties.
    order = np.argsort(-s, kind="stable")[:k]
    return np.sort(np.concatenate([holes, candidates[order]]))


# ---------------------------------------------------------------------------- policies
#
# A selection policy ranks the cached tokens; a budget says how many of the
# ranking to recompute. Both are chosen in the config (``blend_selection``,
# ``blend_budget``), measured against each other in docs/benchmarks.md.

#: The rankings a policy can name. Deviation rankings need the check layer's
#: fresh and cached KV; ``segment_starts`` the runs (EPIC's first tokens of each
#: segment); ``question_attention`` the attention the prompt's tail (the
#: question) pays each token at the check layer.
POLICIES = (
    "k_deviation",
    "v_deviation",
    "kv_deviation",
    "segment_starts",
    "question_attention",
    "random",
)
BUDGETS = ("fixed", "adaptive")


def parse_selection(text: str) -> tuple[str, ...]:
    """``"k_deviation+segment_starts"`` -> its policies (combined by turns); ValueError names
    what is wrong."""
    parts = tuple(p.strip() for p in text.split("+"))
    bad = [p for p in parts if p not in POLICIES]
    if not parts or bad or len(set(parts)) != len(parts):
        raise ValueError(
            f"blend_selection={text!r}: one of {', '.join(POLICIES)}, or several joined by '+' "
            "(each once), e.g. 'k_deviation+segment_starts'"
        )
    return parts


def ranking(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``candidates`` by descending score (NaN first, ties to the earlier token)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64)[candidates], nan=np.inf)
    return np.asarray(candidates, dtype=np.int64)[np.argsort(-s, kind="stable")]


def interleave(orders: list[np.ndarray]) -> np.ndarray:
    """Rankings merged by turns, each token at its first turn: a combined policy spends its
    budget evenly on what each ranking puts first."""
    if len(orders) == 1:
        return np.asarray(orders[0], dtype=np.int64)
    seen: set[int] = set()
    out: list[int] = []
    for row in zip(*orders):
        for t in row:
            if int(t) not in seen:
                seen.add(int(t))
                out.append(int(t))
    return np.asarray(out, dtype=np.int64)


def segment_offsets(cached: np.ndarray) -> np.ndarray:
    """Each token's distance from the start of its cached run (holes: 0)."""
    cached = np.asarray(cached, dtype=bool)
    idx = np.arange(len(cached))
    starts = np.where(cached & ~np.concatenate([[False], cached[:-1]]), idx, 0)
    starts = np.maximum.accumulate(np.where(cached, starts, idx))
    return np.where(cached, idx - starts, 0)


def adaptive_count(
    deviation: np.ndarray, energy: float, target: float, floor: int, cap: int
) -> int:
    """How many of a ranking to recompute: the fewest whose deviation, once recomputed,
    leaves at most ``target`` (relative to ``energy``, the cached tokens' total K energy)
    in the tokens reused; then clamped to ``[floor, cap]``.

    ``deviation``: each ranked token's, in ranking order. A request whose cached KV
    barely moved recomputes the floor; one whose KV moved a lot, up to the cap.
    """
    n = len(deviation)
    cap, floor = min(cap, n), min(floor, n)
    if energy <= 0 or n == 0:
        return floor
    left = float(np.sum(deviation)) - np.concatenate([[0.0], np.cumsum(deviation)])
    ok = np.flatnonzero(left <= target * energy)  # left[j]: after recomputing the first j
    need = int(ok[0]) if ok.size else n
    return max(floor, min(cap, need))


@dataclass(frozen=True)
class SelectionPolicy:
    """Which cached tokens a blend recomputes, from the config's blend keys.

    ``rankings`` order the cached tokens (several: by turns). A ``fixed``
    budget recomputes the check layer's ratio of them; an ``adaptive`` one
    the fewest that leave at most ``target`` of relative K deviation in the
    tokens reused, between ``floor`` and ``cap`` (ratios of the cached
    tokens). ``max_deviation`` > 0 is the guard: a request whose reused tokens
    would keep more deviation than that is recomputed in full.
    """

    rankings: tuple[str, ...] = ("k_deviation",)
    budget: str = "fixed"
    target: float = 1e-4  # the config's default, the measured scale of K deviation
    floor: float = 0.0
    cap: float = 1.0
    max_deviation: float = 0.0

    @classmethod
    def from_config(cls, cfg: Any) -> SelectionPolicy:
        return cls(
            rankings=parse_selection(cfg.blend_selection),
            budget=cfg.blend_budget,
            target=cfg.blend_deviation_target,
            floor=cfg.blend_adaptive_min_ratio,
            cap=cfg.blend_adaptive_max_ratio,
            max_deviation=cfg.blend_max_deviation,
        )

    @property
    def needs_question(self) -> bool:
        return "question_attention" in self.rankings


@dataclass
class CheckOutcome:
    """What one check layer decided, and the deviation it saw (relative to K's energy)."""

    keep: np.ndarray  # sorted rows to keep computing
    deviation: float  # of every cached token still computed, before the selection
    residual: float  # left in the cached tokens not selected (what the request reuses)
    fallback: bool  # the guard tripped: everything is recomputed


def choose(
    policy: SelectionPolicy,
    features: dict[str, np.ndarray],
    cached: np.ndarray,
    active: np.ndarray,
    ratio: float,
    *,
    guard: bool,
) -> CheckOutcome:
    """The rows to keep computing after a check layer.

    ``features``: per row, ``k_deviation`` (|K_fresh - K_cached|^2) and
    ``k_energy`` (|K_fresh|^2) always, plus a score for every ranking the
    policy names. ``guard``: whether the deviation cap applies here (the
    first check layer). Holes are always kept.
    """
    cached = np.asarray(cached, dtype=bool)
    active = np.asarray(active, dtype=np.int64)
    holes = active[~cached[active]]
    cand = active[cached[active]]
    order = interleave([ranking(features[name], cand) for name in policy.rankings])
    n_cached = int(cached.sum())
    dev = np.nan_to_num(np.asarray(features["k_deviation"], dtype=np.float64), nan=np.inf)
    energy = float(np.sum(np.asarray(features["k_energy"], dtype=np.float64)[cand]))
    if policy.budget == "adaptive":
        k = adaptive_count(
            dev[order],
            energy,
            policy.target,
            num_selected(n_cached, policy.floor),
            num_selected(n_cached, policy.cap),
        )
    else:
        k = min(len(cand), num_selected(n_cached, ratio))
    chosen = order[:k]
    scale = energy if energy > 0 else 1.0
    deviation = float(np.sum(dev[cand])) / scale
    residual = float(np.sum(dev[order[k:]])) / scale
    # Not "residual > cap": a NaN or infinite deviation (unreadable KV) trips the guard.
    if guard and policy.max_deviation > 0 and not residual <= policy.max_deviation:
        return CheckOutcome(active.copy(), deviation, residual, True)
    return CheckOutcome(np.sort(np.concatenate([holes, chosen])), deviation, residual, False)
