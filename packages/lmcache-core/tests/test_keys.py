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
from lmcache_core.keys import CacheKey, KeyNamespace, TokenChunker
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
        _tokens(case), cache_salt=case["cache_salt"], partial_multiple=case["partial_multiple"]
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


def test_scheme_v1_is_what_the_docs_say():
    """Recompute the first golden key from the written definition, with hashlib alone."""
    case = GOLDEN["cases"][0]
    tokens = _tokens(case)
    seed = b"lmcache-key\x00v1\x00" + b"sha256" + b"\x00" + (0).to_bytes(4, "little")
    body = b"".join(t.to_bytes(4, "little") for t in tokens[:256])
    prefix = hashlib.sha256(seed + body).hexdigest()
    assert case["expected"][0]["key"] == f"v1-{case['namespace_digest']}-{prefix}"


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
