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
