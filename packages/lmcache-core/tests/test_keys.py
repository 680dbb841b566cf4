"""Chunk keys: golden vectors, prefix chaining, namespaces, stability across processes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmcache_core.errors import TokenError
from lmcache_core.keys import CacheKey, KeyNamespace, MultimodalItem, TokenChunker
from lmcache_core.layout import KVLayout

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_keys.json").read_text())
LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=4, num_kv_heads=2, head_size=64, block_size=16
)


def _tokens(case):
    t = case["tokens"]
    return list(range(*t["range"])) if "range" in t else t["list"]


def _keys(case):
    ns = KeyNamespace(
        case["model"],
        KVLayout(**case["layout"]),
        case["chunk_size"],
        case["world_size"],
        case["rank"],
        case["hash_algorithm"],
    )
    prompt = TokenChunker(case["chunk_size"], case["hash_algorithm"]).chunk(
        _tokens(case),
        cache_salt=case["cache_salt"],
        adapter=case.get("adapter"),
        mm_items=[MultimodalItem(**m) for m in case.get("mm_items", [])],
        partial_multiple=case["partial_multiple"],
    )
    return ns, prompt


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
def test_golden_key_vectors(case):
    ns, prompt = _keys(case)
    assert ns.digest.hex() == case["namespace_digest"]
    got = [
        {"start": s.start, "end": s.end, "key": k.hex()}
        for s, k in zip(prompt.spans(), prompt.keys(ns))
    ]
    assert got == case["expected"]


def _field(text):
    raw = (text or "").encode()
    return len(raw).to_bytes(4, "little") + raw


def _spec_keys(case):
    """The keys of a golden case from the written definition of scheme v2, with hashlib alone."""
    tokens = _tokens(case)
    c = case["chunk_size"]
    seed = (
        b"lmcache-key\x00v2\x00sha256\x00"
        + _field(case["cache_salt"])
        + _field(case.get("adapter"))
    )
    stream, keys = seed, []
    for start in range(0, len(tokens), c):
        chunk = tokens[start : start + c]
        items = sorted(
            (m for m in case.get("mm_items", []) if start <= m["offset"] < start + c),
            key=lambda m: m["offset"],
        )
        stream += len(chunk).to_bytes(4, "little") + len(items).to_bytes(4, "little")
        for m in items:
            ident = m["identifier"].encode()
            stream += m["offset"].to_bytes(8, "little") + m["length"].to_bytes(8, "little")
            stream += len(ident).to_bytes(4, "little") + ident
        stream += b"".join(t.to_bytes(4, "little") for t in chunk)
        keys.append(f"v2-{case['namespace_digest']}-{hashlib.sha256(stream).hexdigest()}")
    return keys


@pytest.mark.parametrize(
    "name",
    ["llama8b-flash-sha256", "salted", "lora-adapter", "multimodal", "salt-adapter-multimodal"],
)
def test_scheme_v2_is_what_the_docs_say(name):
    case = next(c for c in GOLDEN["cases"] if c["name"] == name)
    assert [e["key"] for e in case["expected"]] == _spec_keys(case)


def test_adapter_and_multimodal_items_change_the_keys_they_reach():
    chunker = TokenChunker(256)
    toks = list(range(1000))
    plain = chunker.chunk(toks).digests
    # Another adapter: every key differs (the KV of every token depends on it).
    lora_a = chunker.chunk(toks, adapter="a").digests
    lora_b = chunker.chunk(toks, adapter="b").digests
    assert len(set(plain) | set(lora_a) | set(lora_b)) == 3 * len(plain)
    # Salt and adapter are separate fields: salt "a" is not adapter "a".
    assert chunker.chunk(toks, cache_salt="a").digests != lora_a
    # The same placeholder tokens with another image: keys differ from the
    # chunk the image starts in, and text before it is still shared.
    img1 = chunker.chunk(toks, mm_items=[MultimodalItem("hash-1", 600, 100)]).digests
    img2 = chunker.chunk(toks, mm_items=[MultimodalItem("hash-2", 600, 100)]).digests
    assert img1[:2] == img2[:2] == plain[:2]
    assert img1[2] != img2[2] and img1[3] != img2[3] and img1[2] != plain[2]
    # The same image at another place is other KV (positions are in the key).
    moved = chunker.chunk(toks, mm_items=[MultimodalItem("hash-1", 610, 100)]).digests
    assert moved[2] != img1[2]
    # Items past the prompt (cut by max_tokens) do not change it.
    cut = chunker.chunk(toks, max_tokens=512, mm_items=[MultimodalItem("h", 700, 10)])
    assert cut.digests == plain[:2]
    # The order items are given in does not matter.
    two = [MultimodalItem("x", 10, 5), MultimodalItem("y", 20, 5)]
    assert (
        chunker.chunk(toks, mm_items=two).digests == chunker.chunk(toks, mm_items=two[::-1]).digests
    )
    with pytest.raises(TokenError, match="negative"):
        chunker.chunk(toks, mm_items=[MultimodalItem("z", -1, 5)])


@settings(max_examples=60, deadline=None)
@given(
    a=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    b=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    items_a=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 5)), max_size=3),
    items_b=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 5)), max_size=3),
)
def test_different_inputs_never_share_a_key(a, b, items_a, items_b):
    """Token streams and item records can never be confused (every block is self-delimiting)."""
    chunker = TokenChunker(8)

    def digests(toks, items):
        mm = [MultimodalItem(f"i{ln}", off, ln) for off, ln in items]
        return chunker.chunk(toks, mm_items=mm).digests

    def canon(toks, items):
        return toks, sorted((o, ln) for o, ln in items if o < len(toks))

    da, db = digests(a, items_a), digests(b, items_b)
    for i, (x, y) in enumerate(zip(da, db)):
        end = (i + 1) * 8
        same = canon(a[:end], [m for m in items_a if m[0] < end]) == canon(
            b[:end], [m for m in items_b if m[0] < end]
        )
        assert (x == y) == same


def test_keys_are_stable_across_processes_and_hash_seeds(tmp_path):
    code = (
        "from lmcache_core.keys import *; from lmcache_core.layout import KVLayout\n"
        "ns = KeyNamespace('m', KVLayout(kind='vllm_flash', dtype='bfloat16', num_layers=4,"
        " num_kv_heads=2, head_size=64, block_size=16))\n"
        "p = TokenChunker(256).chunk(list(range(1000)), cache_salt='s')\n"
        "print([k.hex() for k in p.keys(ns)])\n"
    )
    outs = set()
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(out.stdout)
    assert len(outs) == 1


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=200),
    chunk_size=st.integers(1, 40),
    pos=st.integers(0, 10**6),
    new=st.integers(0, 2**32 - 1),
)
def test_a_change_alters_exactly_the_keys_from_its_chunk_on(tokens, chunk_size, pos, new):
    pos %= len(tokens)
    if tokens[pos] == new:
        new = (new + 1) % 2**32
    changed = list(tokens)
    changed[pos] = new
    chunker = TokenChunker(chunk_size)
    a, b = chunker.chunk(tokens), chunker.chunk(changed)
    first_changed = pos // chunk_size
    assert a.digests[:first_changed] == b.digests[:first_changed]
    assert all(x != y for x, y in zip(a.digests[first_changed:], b.digests[first_changed:]))


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300),
    extra=st.lists(st.integers(0, 2**32 - 1), max_size=300),
)
def test_shared_prefix_shares_full_chunk_keys(tokens, extra):
    chunker = TokenChunker(16)
    a = chunker.chunk(tokens, include_partial=False)
    b = chunker.chunk(tokens + extra, include_partial=False)
    assert b.digests[: len(a)] == a.digests


def test_partial_chunk_key_differs_from_any_full_chunk_key():
    chunker = TokenChunker(8)
    p = chunker.chunk(list(range(20)))
    assert [p.end(i) for i in range(len(p))] == [8, 16, 20]
    assert len(set(p.digests)) == 3
    assert chunker.chunk(list(range(20)), include_partial=False).num_tokens == 16


def test_partial_multiple_cuts_the_tail_to_whole_blocks():
    p = TokenChunker(256).chunk(list(range(500)), partial_multiple=128)
    assert [(s.start, s.end) for s in p.spans()] == [(0, 256), (256, 384)]
    assert TokenChunker(256).chunk(list(range(300)), partial_multiple=128).num_tokens == 256


def test_token_inputs_all_give_the_same_keys():
    toks = [5, 0, 2**32 - 1, 151643] * 100
    chunker = TokenChunker(64)
    ref = chunker.chunk(toks).digests
    assert chunker.chunk(np.array(toks, dtype=np.int64)).digests == ref
    assert chunker.chunk(np.array(toks, dtype=np.uint32)).digests == ref
    assert chunker.chunk(tuple(toks)).digests == ref
    raw = b"".join(t.to_bytes(4, "little") for t in toks)
    assert chunker.chunk(raw).digests == ref


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.5], ["a"], np.array([-3]), np.array([0.5])])
def test_bad_token_ids_are_refused_clearly(bad):
    with pytest.raises(TokenError, match="token ids"):
        TokenChunker(4).chunk(bad)


def test_namespace_separates_everything_that_makes_kv_incompatible():
    base = KeyNamespace("m", LAYOUT)
    variants = [
        KeyNamespace("other-model", LAYOUT),
        KeyNamespace(
            "m",
            KVLayout(
                kind="vllm_flash",
                dtype="float16",
                num_layers=4,
                num_kv_heads=2,
                head_size=64,
                block_size=16,
            ),
        ),
        KeyNamespace(
            "m",
            KVLayout(
                kind="vllm_flash",
                dtype="bfloat16",
                num_layers=5,
                num_kv_heads=2,
                head_size=64,
                block_size=16,
            ),
        ),
        KeyNamespace(
            "m",
            KVLayout(
                kind="vllm_cpu",
                dtype="bfloat16",
                num_layers=4,
                num_kv_heads=2,
                head_size=64,
                block_size=16,
            ),
        ),
        KeyNamespace("m", LAYOUT, chunk_size=128),
        KeyNamespace("m", LAYOUT, world_size=2, rank=0),
        KeyNamespace("m", LAYOUT, world_size=2, rank=1),
        KeyNamespace("m", LAYOUT, hash_algorithm="xxh3_128"),
    ]
    digests = {base.digest} | {v.digest for v in variants}
    assert len(digests) == len(variants) + 1


def test_engine_neutral_layouts_share_a_namespace():
    """A chunk written by vLLM's flash layout is readable through SGLang's token layout."""
    flash = KVLayout(
        kind="vllm_flash",
        dtype="bfloat16",
        num_layers=4,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
    )
    sgl = KVLayout(
        kind="sglang_token",
        dtype="bfloat16",
        num_layers=4,
        num_kv_heads=2,
        head_size=64,
        block_size=1,
    )
    assert KeyNamespace("m", flash).digest == KeyNamespace("m", sgl).digest


def test_cache_salt_isolates_tenants():
    chunker = TokenChunker(16)
    toks = list(range(64))
    assert set(chunker.chunk(toks, cache_salt="a").digests).isdisjoint(
        chunker.chunk(toks, cache_salt="b").digests
    )
    assert set(chunker.chunk(toks).digests).isdisjoint(chunker.chunk(toks, cache_salt="a").digests)


def test_cache_key_value_semantics():
    ns = KeyNamespace("m", LAYOUT)
    key = TokenChunker(16).chunk(list(range(16))).keys(ns)[0]
    assert key.namespace == ns.digest and len(key.prefix) == 32
    assert CacheKey.from_hex(key.hex()) == key
    assert CacheKey.from_bytes(key.to_bytes()) == key
    assert pickle.loads(pickle.dumps(key)) == key
    assert type(pickle.loads(pickle.dumps(key))) is CacheKey
    assert hash(CacheKey.of(key.namespace, key.prefix)) == hash(key)
    with pytest.raises(ValueError, match="cache key"):
        CacheKey.from_hex("v2-00-11")
    with pytest.raises(ValueError):
        CacheKey.of(b"short", b"x")


def test_namespace_rejects_bad_rank_and_missing_model():
    with pytest.raises(ValueError, match="rank"):
        KeyNamespace("m", LAYOUT, world_size=2, rank=2)
    with pytest.raises(ValueError, match="model"):
        KeyNamespace("", LAYOUT)
    with pytest.raises(ValueError, match="hash algorithm"):
        KeyNamespace("m", LAYOUT, hash_algorithm="md5")
    assert KeyNamespace("m", LAYOUT, world_size=4, rank=0).for_rank(3).rank == 3


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 900),
    data=st.data(),
    alg=st.sampled_from(["sha256", "xxh3_128"]),
    salt=st.sampled_from([None, "tenant"]),
    adapter=st.sampled_from([None, "lora-a"]),
)
def test_continuation_digests_are_the_shorter_prompts_tail_keys(n, data, alg, salt, adapter):
    """What a prompt cut at start + length stores as its last (partial) chunk."""
    c = TokenChunker(128, alg)
    toks = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    full = data.draw(st.integers(0, n // 128))
    room = min(127, n - full * 128)
    if room < 1:
        return
    lengths = data.draw(st.lists(st.integers(1, room), min_size=1, max_size=5))
    got = c.continuations(toks, full, lengths, cache_salt=salt, adapter=adapter)
    for length, digest in zip(lengths, got):
        short = c.chunk(toks, max_tokens=full * 128 + length, cache_salt=salt, adapter=adapter)
        assert short.digests[-1] == digest and len(short) == full + 1
    other = c.continuations(toks, full, lengths, cache_salt="someone-else", adapter=adapter)
    assert not set(other) & set(got)


def test_continuations_with_images_and_bad_lengths():
    c = TokenChunker(16, "sha256")
    toks = list(range(100))
    items = [MultimodalItem("img-1", 34, 4)]
    (d,) = c.continuations(toks, 2, [5], mm_items=items)
    assert d == c.chunk(toks, max_tokens=37, mm_items=items).digests[-1]
    assert d != c.continuations(toks, 2, [5])[0], "the image's hash reaches the tail key"
    for bad in ([0], [16], [99]):
        with pytest.raises(TokenError, match="do not fit"):
            c.continuations(toks, 2, bad)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 700),
    data=st.data(),
    alg=st.sampled_from(["sha256", "xxh3_128"]),
    salt=st.sampled_from([None, "tenant"]),
    adapter=st.sampled_from([None, "lora-a"]),
    step=st.sampled_from([1, 16, 32, 100]),
)
def test_inner_prefix_digests_are_the_keys_of_prompts_cut_inside_a_chunk(
    n, data, alg, salt, adapter, step
):
    """Chunk i's inner prefixes are the last keys of the prompt cut at each block inside it."""
    c = TokenChunker(128, alg)
    toks = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    lo = data.draw(st.integers(0, n // 128 + 1))
    hi = data.draw(st.integers(lo, n // 128 + 2))
    got = c.inner_prefixes(toks, range(lo, hi), step, cache_salt=salt, adapter=adapter)
    assert len(got) == hi - lo
    for i, digests in zip(range(lo, hi), got):
        own = max(0, min(128, n - i * 128))
        assert len(digests) == len(range(step, own, step))
        for k, digest in enumerate(digests):
            end = i * 128 + (k + 1) * step
            cut = c.chunk(toks, max_tokens=end, cache_salt=salt, adapter=adapter)
            assert cut.digests[-1] == digest and len(cut) == i + 1
        if i * 128 < n and digests:
            # What the continuation lookup of a longer prompt asks for, the same keys.
            lengths = list(range(step, own, step))
            assert c.continuations(toks, i, lengths, cache_salt=salt, adapter=adapter) == digests
    with pytest.raises(ValueError, match="step"):
        c.inner_prefixes(toks, range(0, 1), 0)
