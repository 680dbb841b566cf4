"""KV events without a server: chunk keys to vLLM blocks, and the rank gate."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from lmcache_core.keys import CacheKey
from lmcache_vllm.kv_events import BlockInfo, EventGate, LMCacheKVEvents, WorkerEvents


def _info(nblocks: int, bs: int = 4) -> BlockInfo:
    return BlockInfo([100 + i for i in range(nblocks)], list(range(nblocks * bs)))


def test_a_chunk_becomes_its_full_blocks_and_each_tier_is_reported_once():
    ev = WorkerEvents(block_size=4)
    k0, k1 = CacheKey(b"k0"), CacheKey(b"k1")
    info = _info(3)  # 12 tokens hashed; the prompt has 14
    ev.expect(k0, 0, 8, info)
    ev.expect(k1, 8, 14, info)  # one full block, then a partial one vLLM does not hash
    ev("stored", "cpu", [k0, k1])
    ev("stored", "cpu", [k0])  # already reported for this tier
    ev("stored", "redis", [k0])
    ev("stored", "p2p", [k0])  # another instance's memory: not ours to report
    out = ev.take().get_all_events()
    assert [(e.block_hashes, e.medium) for e in out] == [
        ([100, 101], "CPU"),
        ([102], "CPU"),
        ([100, 101], "REMOTE"),
    ]
    assert out[1].parent_block_hash == 101 and out[1].token_ids == [8, 9, 10, 11]
    assert ev.take() is None
    ev("removed", "cpu", [k0])
    ev("removed", "disk", [k0])  # never stored there: nothing to say
    assert [(e.block_hashes, e.medium) for e in ev.take().get_all_events()] == [([100, 101], "CPU")]


def test_an_event_is_published_once_every_rank_reported_it_even_steps_apart():
    ev0, ev1 = WorkerEvents(4), WorkerEvents(4)
    for ev in (ev0, ev1):
        ev.expect(CacheKey(b"rank-local"), 0, 4, _info(1))
    gate = EventGate(world_size=2)
    ev0("stored", "cpu", [CacheKey(b"rank-local")])
    gate.add(ev0.take())
    assert gate.take() == []  # rank 1 has not stored its shard yet
    ev1("stored", "cpu", [CacheKey(b"rank-local")])
    step = ev1.take()
    assert isinstance(step, LMCacheKVEvents)
    gate.add(step)
    published = gate.take()
    assert len(published) == 1 and published[0].block_hashes == [100]
    assert gate.take() == []
