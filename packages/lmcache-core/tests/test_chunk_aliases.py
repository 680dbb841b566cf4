"""Hits inside a chunk: a prompt that shares only a stored chunk's first blocks loads them.

The numpy transfer stands in for the engine's memory; every load is checked
byte for byte against the KV of the prompt that stored the chunk.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.chunk_aliases import ChunkAliases
from lmcache_core.errors import ConfigError
from lmcache_core.keys import CacheKey, TokenChunker
from lmcache_core.testing.paged_memory import PagedKVMemory as FakeEngine

FLASH = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
)
PACKED = KVLayout(  # vLLM's CPU backend: whole blocks only
    kind="vllm_cpu", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=8
)


def make_engine(layout=FLASH, **cfg) -> CacheEngine:
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB", **cfg})
    return CacheEngine(config, model="test/model", layout=layout)


def store_with_aliases(engine: CacheEngine, tokens, kv, step: int, salt: str | None = None):
    """What the vLLM connector does: store, and register the chunks' block prefixes."""
    engine.store(tokens, kv, cache_salt=salt)
    prompt = engine.chunk(tokens, cache_salt=salt)
    inner = TokenChunker(16).inner_prefixes(tokens, range(len(prompt)), step, cache_salt=salt)
    engine.add_aliases(prompt, dict(enumerate(inner)), step)


@settings(max_examples=40, deadline=None)
@given(ntok=st.integers(1, 64), cut=st.integers(1, 64), seed=st.integers(0, 500))
def test_a_prompt_ending_inside_a_stored_chunk_loads_its_whole_blocks(ntok, cut, seed):
    cut = min(cut, ntok)
    src, dst = FakeEngine(FLASH, seed=seed), FakeEngine(FLASH, seed=seed + 1)
    tokens = list(range(seed, seed + ntok))
    t_src, t_dst = src.table(ntok, seed), dst.table(cut, seed + 3)
    with make_engine() as engine:
        store_with_aliases(engine, tokens, src.kv(t_src), step=4)
        short = tokens[:cut]
        full, rest = (cut // 16) * 16, cut % 16
        stored_tail = ntok - full if ntok < full + 16 else 16  # A's own chunk there
        # The partial chunk is found when A stored it as is, or as a whole-block prefix.
        found = rest == 0 or rest == stored_tail or rest % 4 == 0
        expect = cut if found else full
        assert engine.lookup(short) == expect
        assert engine.retrieve(short, dst.kv(t_dst)) == expect
        if expect:
            assert dst.tokens_kv(t_dst, 0, expect) == src.tokens_kv(t_src, 0, expect)
        inside = found and rest and rest != stored_tail
        assert engine.metrics.get("lmcache:num_partial_chunk_loads") == int(bool(inside))


def test_without_aliases_or_under_another_tenant_the_tail_misses():
    src = FakeEngine(FLASH)
    tokens = list(range(48))
    with make_engine() as engine:
        engine.store(tokens, src.kv(src.table(48, 0)))
        assert engine.lookup(tokens[:24]) == 16, "no aliases registered: chunk granularity"
    with make_engine() as engine:
        store_with_aliases(engine, tokens, src.kv(src.table(48, 0)), step=4, salt="tenant-a")
        assert engine.lookup(tokens[:24], cache_salt="tenant-a") == 24
        assert engine.lookup(tokens[:24], cache_salt="tenant-b") == 0
        assert engine.lookup(tokens[:24]) == 0


def test_an_alias_whose_chunk_left_every_tier_is_a_miss():
    src = FakeEngine(FLASH)
    tokens = list(range(48))
    with make_engine() as engine:
        store_with_aliases(engine, tokens, src.kv(src.table(48, 0)), step=4)
        assert engine.lookup(tokens[:20]) == 20
        engine.remove(tokens)
        assert engine.lookup(tokens[:20]) == 0
        dst = FakeEngine(FLASH, seed=5)
        assert engine.retrieve(tokens[:20], dst.kv(dst.table(20, 1))) == 0


def test_next_chunk_candidates_find_a_longer_prompts_blocks_and_pin_its_chunk():
    """The connector's continuation lookup: one chain per candidate length, checked at once."""
    src = FakeEngine(FLASH)
    a = list(range(48))
    b = a[:22] + [999] * 26  # shares chunk 0 and 6 tokens of chunk 1 (one whole block)
    chunker = TokenChunker(16)
    with make_engine() as engine:
        store_with_aliases(engine, a, src.kv(src.table(48, 0)), step=4)
        head = engine.chunk(b).keys(engine.namespace)[:1]
        tails = chunker.continuations(b, 1, [12, 8, 4])
        ns = engine.namespace.digest
        chains = [head, *([CacheKey(ns + t)] for t in tails)]
        assert engine.lookup_chains(chains, pin_owner="r", aliases=True) == [1, 0, 0, 1]
        a_keys = engine.chunk(a).keys(engine.namespace)
        assert engine.cpu.pinned_keys() == {a_keys[0], a_keys[1]}
        assert engine.lookup_chains(chains, pin_owner="r") == [1, 0, 0, 0], "aliases are opt-in"
        engine.unpin("r")
        # Loading b's hit: chunk 0, then chunk 1's first block out of a's chunk 1.
        dst = FakeEngine(FLASH, seed=9)
        t_a, t_b = src.table(48, 0), dst.table(20, 4)
        got = engine.retrieve(chunker.chunk(b, max_tokens=20), dst.kv(t_b))
        assert got == 20
        assert dst.tokens_kv(t_b, 0, 20) == src.tokens_kv(t_a, 0, 20)


def test_whole_block_layouts_load_whole_blocks_of_a_longer_chunk():
    src, dst = FakeEngine(PACKED, seed=1), FakeEngine(PACKED, seed=2)
    tokens = list(range(48))
    t_src, t_dst = src.table(48, 0), dst.table(24, 1)
    with make_engine(layout=PACKED) as engine:
        store_with_aliases(engine, tokens, src.kv(t_src), step=8)
        assert engine.lookup(tokens[:24]) == 24
        assert engine.lookup(tokens[:28]) == 24  # the partial chunk is cut to whole blocks
        assert engine.retrieve(tokens[:24], dst.kv(t_dst)) == 24
        assert dst.tokens_kv(t_dst, 0, 24) == src.tokens_kv(t_src, 0, 24)


def test_the_alias_map_is_bounded_and_checks_what_it_is_given():
    ns = bytes(16)
    key = [CacheKey.of(ns, bytes([i]) * 8) for i in range(5)]
    aliases = ChunkAliases(max_entries=2)
    aliases.add(key[0], 16, [(key[1], 4), (key[2], 8)])
    assert aliases.resolve(key[1]) == (key[0], 4, 16)
    aliases.add(key[3], 16, [(key[4], 12)])  # key[2] is the least recently used: dropped
    assert len(aliases) == 2
    assert aliases.resolve(key[2]) is None and aliases.resolve(key[4]).target == key[3]
    with pytest.raises(ValueError, match="cannot lie"):
        aliases.add(key[0], 16, [(key[1], 16)])
    off = ChunkAliases(max_entries=0)
    off.add(key[0], 16, [(key[1], 4)])
    assert off.resolve(key[1]) is None


def test_max_chunk_aliases_zero_turns_hits_inside_a_chunk_off():
    src = FakeEngine(FLASH)
    tokens = list(range(48))
    with make_engine(max_chunk_aliases=0) as engine:
        store_with_aliases(engine, tokens, src.kv(src.table(48, 0)), step=4)
        assert engine.lookup(tokens[:24]) == 16
    with pytest.raises(ConfigError, match="max_chunk_aliases"):
        make_engine(max_chunk_aliases=-1)


def test_an_alias_whose_chunk_is_on_a_lower_tier_loads_and_turns_a_miss_when_it_fails(
    tmp_path,
):
    src, dst = FakeEngine(FLASH), FakeEngine(FLASH, seed=4)
    tokens = list(range(48))
    with make_engine(local_disk=str(tmp_path), max_local_disk_size="1MiB") as engine:
        store_with_aliases(engine, tokens, src.kv(src.table(48, 0)), step=4)
        assert engine.flush(10)
        target = engine.chunk(tokens).keys(engine.namespace)[1]
        assert engine.cpu.remove([target]) == 1  # now only the disk tier holds it
        assert engine.lookup(tokens[:20]) == 20
        t_dst = dst.table(20, 1)
        assert engine.retrieve(tokens[:20], dst.kv(t_dst)) == 20
        assert dst.tokens_kv(t_dst, 0, 20) == src.tokens_kv(src.table(48, 0), 0, 20)
        assert engine.cpu.remove([target]) == 1  # promoted by that load: only on disk again
        disk = engine.tiers[1]

        def down(*args, **kwargs):
            raise OSError("disk gone")

        disk.contains = disk.get = down  # the disk fails: a miss, never an error
        assert engine.lookup(tokens[:20]) == 16
        ns = engine.namespace.digest
        candidates = [[CacheKey(ns + t)] for t in TokenChunker(16).continuations(tokens, 1, [4])]
        assert engine.lookup_chains(candidates, aliases=True) == [0]
        assert engine.retrieve(tokens[:20], dst.kv(dst.table(20, 2))) == 16
