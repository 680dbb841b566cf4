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


def test_chunks_written_to_disk_when_dram_is_full_are_announced_on_disk(tmp_path):
    """A real engine with a small DRAM tier and a disk tier: every chunk that reaches the
    disk, by the store's own write or by demotion when DRAM evicts it (the store's write
    was dropped, as a full write-behind queue drops it), is announced as a ``DISK``
    store, and DRAM evictions as ``CPU`` removals."""
    from lmcache_core import CacheConfig, CacheEngine, KVLayout
    from lmcache_core.testing.paged_memory import PagedKVMemory

    layout = KVLayout(
        kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
    )
    chunk = layout.chunk_bytes(16)
    cfg = CacheConfig.from_dict(
        {
            "chunk_size": 16,
            "max_local_cpu_size": f"{4 * chunk + 4096}B",
            "local_disk": f"file://{tmp_path}/",
            "max_local_disk_size": f"{200 * chunk}B",
        }
    )
    src = PagedKVMemory(layout)
    ev = WorkerEvents(block_size=4)
    with CacheEngine(cfg, model="m", layout=layout) as engine:
        engine.watch(ev)
        disk_tier = next(t for t in engine.chunk_store.cascade.tiers if t.name == "disk")
        put = disk_tier.put
        dropped = [0]

        def drop_half_of_the_stores(chunks):
            if len(chunks) > 1 and dropped[0] % 2 == 0:  # a store's write, dropped
                dropped[0] += 1
                return [False] * len(chunks)
            dropped[0] += len(chunks) > 1
            return put(chunks)  # the other stores, and demotions (one chunk each)

        disk_tier.put = drop_half_of_the_stores
        for i in range(10):
            tokens = list(range(1000 * i, 1000 * i + 64))
            keys = engine.chunk(tokens).keys(engine.namespace)
            info = BlockInfo([f"h{i}-{b}".encode() for b in range(16)], tokens)
            for j, key in enumerate(keys):
                ev.expect(key, 16 * j, 16 * (j + 1), info)
            engine.store(tokens, src.kv(src.table(64, i % 2)))
        engine.flush()
        on_disk = engine.metrics.get("lmcache:stored_bytes", tier="disk") // chunk
        demoted = engine.metrics.get("lmcache:num_demotions")
        events = ev.take().get_all_events()
    disk = [e for e in events if type(e).__name__ == "BlockStored" and e.medium == "DISK"]
    cpu_gone = [e for e in events if type(e).__name__ == "BlockRemoved" and e.medium == "CPU"]
    assert demoted > 0, "the scenario demotes"
    assert on_disk > 0 and len(disk) == on_disk  # every disk write, demotions included
    assert len({tuple(e.block_hashes) for e in disk}) == len(disk)
    assert cpu_gone  # DRAM evicted
    # A demoted chunk's disk store comes before its DRAM removal: never held nowhere.
    for e in cpu_gone:
        hashes = e.block_hashes
        stored_at = [i for i, x in enumerate(events) if x in disk and x.block_hashes == hashes]
        if stored_at:
            assert stored_at[0] < events.index(e)
