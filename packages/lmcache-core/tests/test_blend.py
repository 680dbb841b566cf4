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
