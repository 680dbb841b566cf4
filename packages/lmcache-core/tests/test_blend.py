"""The engine-agnostic part of blending: RoPE shift maths, segments, keys, plans, selection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmcache_core.blend import (
    Segment,
    num_selected,
    plan_blend,
    rope,
    segment_prompt,
    segments_from_spans,
    segments_from_text,
    select_tokens,
)
from lmcache_core.blend.selection import (
    SelectionPolicy,
    choose,
    interleave,
    parse_selection,
    segment_offsets,
)
from lmcache_core.config import CacheConfig
from lmcache_core.errors import ConfigError, TokenError
from lmcache_core.keys import TokenChunker

# ---------------------------------------------------------------------------- RoPE shift


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_shifted_keys_equal_keys_computed_at_the_new_positions(neox, rotary_dim):
    rng = np.random.default_rng(0)
    head_size, n = 64, 50
    freqs = rope.inv_freq(rotary_dim, base=10000.0)
    raw = rng.standard_normal((n, 4, head_size))  # keys before RoPE
    old = rng.integers(0, 5000, n)
    for delta in (rng.integers(-4000, 4000, n), 7, -old, 30000):
        new = old + delta
        stored = rope.apply_rope(raw, old, freqs, neox=neox)
        moved = rope.shift(stored, delta, freqs, neox=neox)
        fresh = rope.apply_rope(raw, new, freqs, neox=neox)
        np.testing.assert_allclose(moved, fresh, atol=1e-9)
        # Dimensions past rotary_dim never move.
        np.testing.assert_array_equal(moved[..., rotary_dim:], raw[..., rotary_dim:])


def test_a_zero_shift_is_the_identity_and_pairs_differ_by_style():
    rng = np.random.default_rng(1)
    k = rng.standard_normal((5, 2, 8))
    freqs = rope.inv_freq(8)
    np.testing.assert_array_equal(rope.shift(k, 0, freqs), k)
    neox = rope.shift(k, 3, freqs, neox=True)
    gptj = rope.shift(k, 3, freqs, neox=False)
    assert not np.allclose(neox, gptj)
    # A rotation keeps each pair's length: neox pairs (i, i+d/2), GPT-J pairs (2i, 2i+1).
    np.testing.assert_allclose(
        neox[..., :4] ** 2 + neox[..., 4:] ** 2, k[..., :4] ** 2 + k[..., 4:] ** 2
    )
    np.testing.assert_allclose(
        gptj[..., 0::2] ** 2 + gptj[..., 1::2] ** 2, k[..., 0::2] ** 2 + k[..., 1::2] ** 2
    )


# ---------------------------------------------------------------------------- segments


def _tokenize(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Offsets of ``pieces`` laid end to end (they must spell ``text``)."""
    assert "".join(pieces) == text
    out, pos = [], 0
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


def test_segments_keep_only_tokens_strictly_inside_and_find_a_document_anywhere():
    sep = " # # "
    # The same document after BOS-like text and after a separator: byte-level BPE puts
    # the separator's last space on the document's first word.
    doc = ["Doc", " one", " is", " here", "."]
    a_text = "Doc one is here. # # Q?"
    a_pieces = ["Doc", " one", " is", " here", ".", " #", " #", " Q", "?"]
    b_text = "Intro # # Doc one is here. # # Q?"
    b_pieces = ["Intro", " #", " #", " Doc", " one", " is", " here", ".", " #", " #", " Q", "?"]
    a = segments_from_text(a_text, _tokenize(a_text, a_pieces), sep)
    b = segments_from_text(b_text, _tokenize(b_text, b_pieces), sep)
    a_doc = [a_pieces[i] for i in range(a[0].start, a[0].end)]
    b_doc = [b_pieces[i] for i in range(b[0].start, b[0].end)]  # "Intro" alone is empty
    assert a_doc == b_doc == doc[1:-1]  # first and last token left out in both
    assert len(a) == len(b) == 1  # "Q?" keeps no token strictly inside either


def test_segments_skip_special_tokens_and_merged_boundaries():
    text = "<s>Alpha beta gamma.# # Delta eps"
    # "<s>" is a special token; ".#" merged across the boundary.
    pieces = ["<s>", "Alpha", " beta", " gamma", ".#", " #", " Delta", " eps"]
    offsets = _tokenize(text, pieces)
    offsets[0] = (0, 0)  # special tokens often carry an empty range
    text2 = "Alpha beta gamma.# # Delta eps"
    offsets2 = [(0, 0)] + [(a - 3, b - 3) for a, b in offsets[1:]]
    segs = segments_from_text(text2, offsets2, "# # ")
    # "<s>" has no range, "Alpha" starts the text, ".#" straddles the separator.
    assert segs[0] == Segment(2, 4)
    assert [pieces[s.start : s.end] for s in segs] == [[" beta", " gamma"]]
    assert segments_from_text(text, offsets, "no such separator") == []
    with pytest.raises(ValueError):
        segments_from_text(text, offsets, "")


def test_explicit_spans_are_checked():
    assert segments_from_spans([[0, 5], [7, 9]], 10) == [Segment(0, 5), Segment(7, 9)]
    for bad in ([[5, 3]], [[0, 11]], [[0, 5], [4, 6]], [[0, True]], "0-5", [[0, 1, 2]]):
        with pytest.raises(TokenError):
            segments_from_spans(bad, 10)


@settings(max_examples=60, deadline=None)
@given(
    doc=st.lists(st.integers(0, 50000), min_size=1, max_size=600),
    before=st.lists(st.integers(0, 50000), max_size=700),
    salt=st.sampled_from([None, "tenant-a"]),
)
def test_segment_keys_do_not_depend_on_position(doc, before, salt):
    chunker = TokenChunker(256)
    tokens = before + doc
    here = segment_prompt(chunker, tokens, Segment(len(before), len(tokens)), cache_salt=salt)
    alone = segment_prompt(chunker, doc, Segment(0, len(doc)), cache_salt=salt)
    assert here.digests == alone.digests
    assert len(here) == -(-len(doc) // 256)  # the partial chunk is included
    other = segment_prompt(chunker, doc, Segment(0, len(doc)), cache_salt="tenant-b")
    assert not set(other.digests) & set(alone.digests)


# ---------------------------------------------------------------------------- plans


def test_a_plan_reuses_cached_runs_anywhere_and_recomputes_holes():
    chunker = TokenChunker(4)
    tokens = list(range(40))
    segs = [Segment(1, 9), Segment(12, 20), Segment(23, 31), Segment(33, 40)]
    prompts = [segment_prompt(chunker, tokens, s) for s in segs]
    # Segment 1 not cached (a hole between cached ones); segment 2 half cached.
    plan = plan_blend(segs, prompts, [2, 0, 1, 0], num_tokens=40, computed=0, min_tokens=1)
    assert plan is not None
    assert [(r.segment, r.start, r.num_tokens) for r in plan.runs] == [(0, 1, 8), (2, 23, 4)]
    assert (plan.computed, plan.until, plan.reused_tokens) == (0, 27, 12)
    # The engine holds the first 4 tokens already: the run is cut, the range starts there.
    plan = plan_blend(segs, prompts, [2, 0, 1, 0], num_tokens=40, computed=4, min_tokens=1)
    assert [(r.start, r.num_tokens, r.num_chunks) for r in plan.runs] == [(4, 5, 2), (23, 4, 1)]
    # The last prompt token is always computed by the engine.
    plan = plan_blend(segs, prompts, [0, 0, 0, 2], num_tokens=40, computed=0, min_tokens=1)
    assert plan.until == 39 and plan.runs[0].num_tokens == 6
    # Too little to reuse: compute everything.
    assert plan_blend(segs, prompts, [1, 0, 0, 0], num_tokens=40, computed=0, min_tokens=5) is None
    assert plan_blend(segs, prompts, [0, 0, 0, 0], num_tokens=40, computed=0, min_tokens=1) is None


# ---------------------------------------------------------------------------- selection


def _reference(scores, cached, active, ratio):
    k = num_selected(int(np.sum(cached)), ratio)
    cand = sorted((i for i in active if cached[i]), key=lambda i: (-scores[i], i))[:k]
    return sorted([i for i in active if not cached[i]] + cand)


@settings(max_examples=100, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(0, 100), st.booleans()), min_size=1, max_size=80),
    ratio=st.floats(0, 1),
    drop=st.integers(0, 5),
)
def test_selection_keeps_holes_and_the_highest_scoring_cached_tokens(data, ratio, drop):
    scores = np.array([s for s, _ in data])
    cached = np.array([c for _, c in data])
    active = np.arange(len(data))[drop:] if drop < len(data) else np.arange(len(data))
    got = select_tokens(scores, cached, active, ratio).tolist()
    assert got == _reference(scores, cached, active, ratio)
    assert set(got) <= set(active.tolist())


def test_selection_at_the_ends_of_the_ratio_and_with_nan():
    scores = np.array([0.5, np.nan, 0.1, 0.9])
    cached = np.array([True, True, True, False])
    active = np.arange(4)
    assert select_tokens(scores, cached, active, 0.0).tolist() == [3]  # holes only
    assert select_tokens(scores, cached, active, 1.0).tolist() == [0, 1, 2, 3]
    assert select_tokens(scores, cached, active, 0.34).tolist() == [1, 3]  # NaN ranks first


# ---------------------------------------------------------------------------- policies


def _features(dev, energy, extra=None):
    f = {"k_deviation": np.asarray(dev, float), "k_energy": np.asarray(energy, float)}
    return {**f, **(extra or {})}


@settings(max_examples=100, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(0, 100), st.booleans()), min_size=1, max_size=80),
    ratio=st.floats(0, 1),
)
def test_a_fixed_k_deviation_policy_is_the_classic_selection(data, ratio):
    dev = np.array([s for s, _ in data])
    cached = np.array([c for _, c in data])
    active = np.arange(len(data))
    out = choose(SelectionPolicy(), _features(dev, dev + 1), cached, active, ratio, guard=True)
    assert out.keep.tolist() == select_tokens(dev, cached, active, ratio).tolist()
    assert not out.fallback and 0 <= out.residual <= out.deviation + 1e-12


@settings(max_examples=100, deadline=None)
@given(
    dev=st.lists(st.floats(0, 10), min_size=1, max_size=60),
    energy=st.floats(1, 1000),
    targets=st.lists(st.floats(0, 0.2), min_size=2, max_size=4),
    floor=st.floats(0, 0.5),
    cap=st.floats(0.5, 1),
)
def test_the_adaptive_budget_meets_its_target_within_floor_and_cap(
    dev, energy, targets, floor, cap
):
    dev = np.array(dev)
    n = len(dev)
    cached = np.ones(n, bool)
    active = np.arange(n)
    e = np.full(n, energy / n)
    kept = []
    for t in sorted(targets, reverse=True):
        pol = SelectionPolicy(budget="adaptive", target=t, floor=floor, cap=cap)
        out = choose(pol, _features(dev, e), cached, active, 1.0, guard=False)
        k = len(out.keep)
        assert num_selected(n, floor) <= k <= max(num_selected(n, cap), num_selected(n, floor))
        if k < num_selected(n, cap):  # below the cap the target is met, with the fewest
            assert out.residual <= t + 1e-9
            if k > num_selected(n, floor):
                top = np.sort(dev)[::-1]
                assert (dev.sum() - top[: k - 1].sum()) / energy > t - 1e-9
        kept.append(k)
    assert kept == sorted(kept)  # a tighter target never recomputes less


def test_the_guard_recomputes_everything_only_when_what_is_left_exceeds_the_cap():
    dev = np.array([4.0, 3.0, 2.0, 1.0, 0.0])
    cached = np.array([True, True, True, True, False])
    active = np.arange(5)
    f = _features(dev, np.full(5, 20.0))  # energy 80 over the cached
    pol = SelectionPolicy(max_deviation=0.05)
    out = choose(pol, f, cached, active, 0.25, guard=True)  # keeps 1: 6/80 left
    assert out.fallback and out.keep.tolist() == [0, 1, 2, 3, 4]
    assert out.deviation == pytest.approx(10 / 80) and out.residual == pytest.approx(6 / 80)
    out = choose(pol, f, cached, active, 0.5, guard=True)  # keeps 2: 3/80 left
    assert not out.fallback and out.keep.tolist() == [0, 1, 4]
    out = choose(pol, f, cached, active, 0.25, guard=False)  # later check layers: no guard
    assert not out.fallback and out.keep.tolist() == [0, 4]
    off = SelectionPolicy(max_deviation=0.0)
    assert not choose(off, f, cached, active, 0.0, guard=True).fallback


def test_an_unreadable_deviation_trips_the_guard_instead_of_reading_as_zero():
    dev = np.array([np.nan, 1.0, 2.0, np.inf])
    cached = np.ones(4, bool)
    f = _features(dev, np.full(4, 10.0), {"segment_starts": np.array([0.0, -1, -2, -3])})
    pol = SelectionPolicy(rankings=("segment_starts",), max_deviation=0.5)
    out = choose(pol, f, cached, np.arange(4), 0.25, guard=True)
    assert out.fallback and out.keep.tolist() == [0, 1, 2, 3]


def test_combined_rankings_take_turns_and_segment_starts_rank_each_runs_first_tokens():
    cached = np.array([False, True, True, True, False, True, True, False], bool)
    assert segment_offsets(cached).tolist() == [0, 0, 1, 2, 0, 0, 1, 0]
    dev = np.array([0, 1, 9, 8, 0, 2, 7, 0], float)
    f = _features(dev, np.ones(8), {"segment_starts": -segment_offsets(cached).astype(float)})
    active = np.arange(8)
    starts = SelectionPolicy(rankings=("segment_starts",))
    assert choose(starts, f, cached, active, 0.4, guard=False).keep.tolist() == [0, 1, 4, 5, 7]
    both = SelectionPolicy(rankings=("k_deviation", "segment_starts"))
    # Turns: K's best (2), the first start (1), K's next (3), the next start (5).
    assert choose(both, f, cached, active, 0.8, guard=False).keep.tolist() == [0, 1, 2, 3, 4, 5, 7]
    assert interleave([np.array([2, 3, 6]), np.array([1, 5, 2])]).tolist() == [2, 1, 3, 5, 6]


def test_selection_names_are_checked_and_reported_with_what_to_write():
    assert parse_selection("k_deviation+question_attention") == (
        "k_deviation",
        "question_attention",
    )
    for bad in ("", "k", "k_deviation+k_deviation", "k_deviation,v_deviation"):
        with pytest.raises(ValueError, match="one of k_deviation"):
            parse_selection(bad)
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict(
            {
                "blend_selection": "kdev",
                "blend_budget": "auto",
                "blend_adaptive_min_ratio": 0.6,
                "blend_adaptive_max_ratio": 0.4,
            }
        )
    text = str(e.value)
    assert "blend_selection='kdev'" in text and "blend_budget='auto'" in text
    assert "blend_adaptive_min_ratio=0.6 is above" in text
    assert SelectionPolicy.from_config(CacheConfig()).rankings == ("k_deviation", "segment_starts")
    assert CacheConfig().blend_recompute_ratios == (0.4,)  # chosen in docs/blending.md


# ---------------------------------------------------------------------------- config


def test_blend_config_keys_and_their_errors():
    c = CacheConfig.from_dict(
        {
            "enable_blending": "true",
            "blend_check_layers": "1,3",
            "blend_recompute_ratios": [0.3, 0.1],
            "blend_special_str": " ## ",
        }
    )
    assert (c.enable_blending, c.blend_check_layers, c.blend_recompute_ratios) == (
        True,
        (1, 3),
        (0.3, 0.1),
    )
    assert c.blend_special_str == " ## "  # spaces kept
    assert CacheConfig().blend_special_str == " # # "
    for bad, words in (
        ({"blend_check_layers": [1, 2]}, "one ratio per check layer"),
        ({"blend_recompute_ratios": ["nan"]}, "must be a finite number"),
        ({"blend_recompute_ratios": [1.5]}, "must lie in [0, 1]"),
        ({"blend_check_layers": [3, 1], "blend_recompute_ratios": [0.2, 0.1]}, "increasing"),
        ({"blend_check_layers": [1, 3], "blend_recompute_ratios": [0.1, 0.2]}, "must not grow"),
        ({"blend_check_layers": "x"}, "blend_check_layers"),
        ({"blend_min_tokens": 0}, "blend_min_tokens"),
    ):
        with pytest.raises(ConfigError) as e:
            CacheConfig.from_dict(bad)
        assert words in str(e.value), str(e.value)
