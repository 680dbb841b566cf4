"""CacheEngine end to end over the CPU tier, with the numpy transfer as the engine's memory."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.backends.base import StorageBackend
from lmcache_core.backends.cpu import LocalCPUBackend
from lmcache_core.errors import ConfigError, LayoutError
from lmcache_core.pool import SlotPool
from lmcache_core.testing.paged_memory import PagedKVMemory as FakeEngine

LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
)


def make_engine(layout=LAYOUT, **cfg) -> CacheEngine:
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB", **cfg})
    return CacheEngine(config, model="test/model", layout=layout)


@settings(max_examples=40, deadline=None)
@given(ntok=st.integers(1, 150), seed=st.integers(0, 1000), partial=st.booleans())
def test_retrieved_kv_equals_stored_kv_byte_for_byte(ntok, seed, partial):
    src, dst = FakeEngine(LAYOUT, seed=seed), FakeEngine(LAYOUT, seed=seed + 1)
    tokens = list(range(seed, seed + ntok))
    t_src, t_dst = src.table(ntok, seed), dst.table(ntok, seed + 7)
    with make_engine(save_unfull_chunk=partial) as engine:
        stored = engine.store(tokens, src.kv(t_src))
        expect = ntok if partial else (ntok // 16) * 16
        assert stored == expect
        assert engine.lookup(tokens) == expect
        got = engine.retrieve(tokens, dst.kv(t_dst))
        assert got == expect
        if expect:
            assert dst.tokens_kv(t_dst, 0, expect) == src.tokens_kv(t_src, 0, expect)


def test_lookup_returns_the_longest_cached_prefix():
    src = FakeEngine(LAYOUT)
    a = list(range(100))
    b = a[:40] + [999] * 60  # shares 2 full chunks (32 tokens) and part of the third
    with make_engine() as engine:
        engine.store(a, src.kv(src.table(100, 0)))
        assert engine.lookup(a) == 100
        assert engine.lookup(b) == 32
        assert engine.lookup(a[:64]) == 64
        assert engine.lookup(a[:70]) == 64  # the partial chunk of 70 tokens was never stored
        assert engine.lookup([5] + a[1:]) == 0


def test_store_skips_chunks_already_cached():
    src = FakeEngine(LAYOUT)
    tokens = list(range(64))
    with make_engine() as engine:
        assert engine.store(tokens[:32], src.kv(src.table(32, 0))) == 32
        assert engine.store(tokens, src.kv(src.table(64, 0))) == 32
        assert engine.store(tokens, src.kv(src.table(64, 0))) == 0
        assert engine.metrics.get("lmcache:num_stored_tokens") == 64


def test_retrieve_respects_write_from_and_max_tokens():
    src, dst = FakeEngine(LAYOUT, seed=1), FakeEngine(LAYOUT, seed=2)
    tokens = list(range(64))
    t_src, t_dst = src.table(64, 0), dst.table(64, 1)
    head, tail = dst.tokens_kv(t_dst, 0, 20), dst.tokens_kv(t_dst, 48, 64)
    with make_engine() as engine:
        engine.store(tokens, src.kv(t_src))
        assert engine.retrieve(tokens, dst.kv(t_dst), write_from=20, max_tokens=48) == 48
    assert dst.tokens_kv(t_dst, 0, 20) == head
    assert dst.tokens_kv(t_dst, 20, 48) == src.tokens_kv(t_src, 20, 48)
    assert dst.tokens_kv(t_dst, 48, 64) == tail


def test_salts_and_ranks_never_share_kv():
    src = FakeEngine(LAYOUT)
    tokens = list(range(32))
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"})
    with make_engine() as engine:
        engine.store(tokens, src.kv(src.table(32, 0)), cache_salt="tenant-a")
        assert engine.lookup(tokens, cache_salt="tenant-a") == 32
        assert engine.lookup(tokens, cache_salt="tenant-b") == 0
        assert engine.lookup(tokens) == 0
        rank1 = CacheEngine(
            config, model="test/model", layout=LAYOUT, world_size=2, rank=1, tiers=engine.tiers
        )
        assert rank1.lookup(tokens, cache_salt="tenant-a") == 0


def test_pinned_chunks_survive_pressure_until_retrieved():
    src, dst = FakeEngine(LAYOUT, num_blocks=256), FakeEngine(LAYOUT, num_blocks=256, seed=3)
    slot = LAYOUT.chunk_bytes(16)
    with make_engine(max_local_cpu_size=f"{4 * 4096 + 2048}B") as engine:
        assert engine.pool.num_slots == 4 and engine.pool.slot_bytes == 4096 >= slot
        a = list(range(32))
        engine.store(a, src.kv(src.table(32, 0)))
        assert engine.lookup(a, pin_owner="req-1") == 32
        for r in range(5):  # flood with other prompts
            other = list(range(1000 * (r + 1), 1000 * (r + 1) + 32))
            engine.store(other, src.kv(src.table(32, r + 1)))
        assert engine.lookup(a) == 32, "pinned chunks were evicted"
        assert engine.retrieve(a, dst.kv(dst.table(32, 9)), pin_owner="req-1") == 32
        engine.store(list(range(90000, 90064)), src.kv(src.table(64, 7)))
        assert engine.lookup(a) == 0, "retrieve should have released the pins"


def test_abandoned_pins_expire():
    src = FakeEngine(LAYOUT, num_blocks=256)
    with make_engine(max_local_cpu_size=f"{2 * 4096 + 2048}B", pin_timeout=0.05) as engine:
        a = list(range(32))
        engine.store(a, src.kv(src.table(32, 0)))
        engine.lookup(a, pin_owner="vanished-request")
        assert engine.store(list(range(100, 132)), src.kv(src.table(32, 1))) == 0
        time.sleep(0.1)
        assert engine.store(list(range(100, 132)), src.kv(src.table(32, 1))) == 32


class BrokenReader:
    def read_chunks(self, chunks):
        raise RuntimeError("engine memory went away")


class BrokenWriter:
    def write_chunks(self, chunks):
        raise RuntimeError("engine memory went away")


def test_reader_and_writer_failures_become_misses():
    src = FakeEngine(LAYOUT)
    tokens = list(range(32))
    with make_engine() as engine:
        assert engine.store(tokens, BrokenReader()) == 0
        assert engine.lookup(tokens) == 0
        assert engine.pool.free_slots == engine.pool.num_slots, "a failed store leaked slots"
        engine.store(tokens, src.kv(src.table(32, 0)))
        assert engine.retrieve(tokens, BrokenWriter()) == 0
        assert engine.metrics.get("lmcache:num_failures") == 2


class DownTier(StorageBackend):
    """A tier whose server is down: every call raises."""

    name = "down"
    capabilities = LocalCPUBackend.capabilities

    def contains(self, keys):
        raise ConnectionError("down")

    get = put = remove = contains
    used_bytes = 0
    capacity_bytes = 0


def test_a_failing_tier_is_a_miss_not_an_error():
    src, dst = FakeEngine(LAYOUT), FakeEngine(LAYOUT, seed=5)
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"})
    pool = SlotPool.anonymous(1024 * 1024, LAYOUT.chunk_bytes(16))
    cpu = LocalCPUBackend(pool)
    engine = CacheEngine(config, model="m", layout=LAYOUT, tiers=[DownTier(), cpu])
    tokens = list(range(48))
    assert engine.lookup(tokens) == 0
    assert engine.store(tokens, src.kv(src.table(48, 0))) == 0  # first tier down: nothing counted
    assert cpu.contains(engine.chunk(tokens).keys(engine.namespace)) == [True] * 3
    assert engine.lookup(tokens) == 48
    assert engine.retrieve(tokens, dst.kv(dst.table(48, 1))) == 48
    assert engine.metrics.get("lmcache:num_failures") >= 3


def test_opaque_block_layout_stores_whole_blocks_only():
    cpu = KVLayout(
        kind="vllm_cpu", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=8
    )
    src, dst = FakeEngine(cpu, seed=1), FakeEngine(cpu, seed=2)
    tokens = list(range(45))  # 2 chunks of 16, then 13 tokens: one whole block of 8
    t_src, t_dst = src.table(45, 0), dst.table(45, 1)
    with make_engine(layout=cpu) as engine:
        assert engine.store(tokens, src.kv(t_src)) == 40
        assert engine.lookup(tokens) == 40
        assert engine.retrieve(tokens, dst.kv(t_dst)) == 40
        assert dst.tokens_kv(t_dst, 0, 40) == src.tokens_kv(t_src, 0, 40)
    with pytest.raises(LayoutError, match="multiple of 8"):
        make_engine(layout=cpu, chunk_size=12)


def test_configuration_errors_say_what_to_change():
    big = KVLayout(
        kind="vllm_flash",
        dtype="bfloat16",
        num_layers=32,
        num_kv_heads=8,
        head_size=128,
        block_size=16,
    )
    with pytest.raises(ConfigError, match="raise it to at least 32.0 MiB"):
        make_engine(layout=big, chunk_size=256, max_local_cpu_size="16MiB")
    with pytest.raises(ConfigError, match="cannot be reserved"):
        make_engine(max_local_cpu_size=10**9)  # a bare number is GB: 1 EB
    # A remote_url no installed tier serves fails when the config is read, not at
    # engine build, and says what to install where it knows.
    with pytest.raises(ConfigError, match=r"pip install 'lmcache\[tape\]'"):
        from lmcache_core import plugins

        plugins.KNOWN_PLUGINS[plugins.BACKENDS]["tape"] = "pip install 'lmcache[tape]'"
        try:
            make_engine(remote_url="tape://drive0")
        finally:
            del plugins.KNOWN_PLUGINS[plugins.BACKENDS]["tape"]
    with pytest.raises(ConfigError, match=r"no installed tier serves weird://.*installed: fs"):
        make_engine(remote_url="weird://x")


def test_no_cpu_tier_means_misses_but_no_errors():
    src = FakeEngine(LAYOUT)
    with make_engine(local_cpu=False) as engine:
        assert engine.tiers == []
        assert engine.store(list(range(32)), src.kv(src.table(32, 0))) == 0
        assert engine.lookup(list(range(32))) == 0


def test_metrics_count_lookups_hits_and_bytes():
    src, dst = FakeEngine(LAYOUT), FakeEngine(LAYOUT, seed=4)
    tokens = list(range(40))
    with make_engine() as engine:
        engine.store(tokens, src.kv(src.table(40, 0)))
        engine.lookup(tokens)
        engine.lookup(tokens[:20] + [7] * 20)
        engine.retrieve(tokens, dst.kv(dst.table(40, 1)))
        m = engine.metrics
        assert m.get("lmcache:num_lookup_requests") == 2
        assert m.get("lmcache:num_lookup_tokens") == 80
        assert m.get("lmcache:num_lookup_hits") == 40 + 16
        assert m.get("lmcache:num_hit_tokens") == 40  # upstream's meaning: retrieved
        assert m.get("lmcache:num_requested_tokens") == 40
        assert m.get("lmcache:time_to_lookup") == 2  # observations
        assert m.get("lmcache:time_to_retrieve") == 1
        assert m.get("lmcache:time_to_store") == 1
        assert m.get("lmcache:stored_bytes", tier="cpu") == LAYOUT.chunk_bytes(40)
        assert m.get("lmcache:retrieved_bytes", tier="cpu") == LAYOUT.chunk_bytes(40)
        text = m.render_prometheus()
        assert 'lmcache:stored_bytes_total{tier="cpu"}' in text
        assert "lmcache:num_hit_tokens_total 40.0" in text
        assert "lmcache:time_to_store_count 1.0" in text
        assert engine.remove(tokens) == 3
        assert engine.lookup(tokens) == 0


def test_retrieve_loads_part_of_a_chunk_that_straddles_max_tokens():
    src, dst = FakeEngine(LAYOUT, seed=1), FakeEngine(LAYOUT, seed=2)
    tokens = list(range(64))
    t_src, t_dst = src.table(64, 0), dst.table(64, 1)
    tail = dst.tokens_kv(t_dst, 40, 64)
    with make_engine() as engine:
        engine.store(tokens, src.kv(t_src))
        assert engine.retrieve(tokens, dst.kv(t_dst), max_tokens=40) == 40
    assert dst.tokens_kv(t_dst, 0, 40) == src.tokens_kv(t_src, 0, 40)
    assert dst.tokens_kv(t_dst, 40, 64) == tail


def test_a_prompt_hashed_once_is_reused_as_is():
    src = FakeEngine(LAYOUT)
    with make_engine() as engine:
        prompt = engine.chunk(list(range(48)))
        engine.store(prompt, src.kv(src.table(48, 0)))
        assert engine.lookup(prompt) == 48
        assert engine.lookup(list(range(48))) == 48
        other = make_engine(chunk_size=32)
        with pytest.raises(ValueError, match="chunked by 16"):
            other.lookup(prompt)
        other.close()


def test_dram_checksums_turn_a_stray_write_into_a_miss():
    src, dst = FakeEngine(LAYOUT, seed=1), FakeEngine(LAYOUT, seed=2)
    tokens = list(range(48))
    with make_engine(local_cpu_checksums=True) as engine:
        engine.store(tokens, src.kv(src.table(48, 0)))
        keys = engine.chunk(tokens).keys(engine.namespace)
        (chunk,) = engine.cpu.get([keys[1]])
        chunk.view[5] ^= 0xFF  # a stray write into the arena
        chunk.release()
        assert engine.retrieve(tokens, dst.kv(dst.table(48, 1))) == 16
        assert engine.metrics.get("lmcache:num_corrupt_chunks") == 1
        assert engine.lookup(tokens) == 16


def test_key_level_store_and_retrieve_for_engines_that_name_their_pages():
    """SGLang names pages by its own hashes: store/retrieve by keys the caller gives."""
    from lmcache_core.keys import CacheKey, ChunkSpan

    src, dst = FakeEngine(LAYOUT, seed=1), FakeEngine(LAYOUT, seed=2)
    with make_engine() as engine:
        ns = engine.namespace.digest
        keys = [CacheKey.of(ns, bytes([i]) * 32) for i in range(3)]
        spans = [ChunkSpan(16 * i, 16 * (i + 1), b"") for i in range(3)]
        t_src, t_dst = src.table(48, 0), dst.table(48, 1)
        assert engine.store_chunks(keys[:2], spans[:2], src.kv(t_src)) == 32
        assert engine.store_chunks(keys[:2], spans[:2], src.kv(t_src)) == 0  # held already
        assert engine.prefix_present(keys) == 2
        assert engine.retrieve_chunks(keys, spans, dst.kv(t_dst)) == 2
        assert dst.tokens_kv(t_dst, 0, 32) == src.tokens_kv(t_src, 0, 32)
        assert engine.retrieve_chunks(keys[2:], spans[2:], dst.kv(t_dst)) == 0


def test_lookup_of_independent_chains_pins_every_chains_hits():
    """Blend segments are separately keyed chains; one lookup pins all their hits."""
    src = FakeEngine(LAYOUT)
    a, b = list(range(48)), list(range(100, 132))
    with make_engine() as engine:
        engine.store(a[:32], src.kv(src.table(48, 0)))  # 2 of a's 3 chunks
        engine.store(b[:16], src.kv(src.table(32, 1)))  # 1 of b's 2 chunks
        ka = engine.chunk(a).keys(engine.namespace)
        kb = engine.chunk(b).keys(engine.namespace)
        assert engine.lookup_chains([ka, kb, []], pin_owner="req") == [2, 1, 0]
        assert engine.cpu.pinned_keys() == {*ka[:2], kb[0]}
        # The same owner's next lookup replaces its pins; unpin drops them.
        assert engine.lookup_chains([kb], pin_owner="req") == [1]
        assert engine.cpu.pinned_keys() == {kb[0]}
        engine.unpin("req")
        assert engine.cpu.pinned_keys() == set()


def test_watchers_see_chunks_enter_and_leave_tiers(tmp_path):
    """What KV cache events are made from: stores per tier, evictions, removals."""
    src = FakeEngine(LAYOUT)
    seen: list[tuple[str, str, int]] = []
    chunk = LAYOUT.chunk_bytes(16)
    with make_engine(
        max_local_cpu_size=f"{2 * chunk + 4096}B",
        local_disk=f"file://{tmp_path}/",
        max_local_disk_size=f"{2 * chunk + 512}B",
    ) as engine:
        engine.watch(lambda ev, tier, keys: seen.append((ev, tier, len(keys))))
        engine.store(list(range(32)), src.kv(src.table(32, 0)))
        engine.flush()
        assert ("stored", "cpu", 2) in seen
        assert sum(n for ev, t, n in seen if (ev, t) == ("stored", "disk")) == 2
        seen.clear()
        engine.store(list(range(100, 132)), src.kv(src.table(32, 1)))  # evicts both
        engine.flush()
        assert sum(n for ev, t, n in seen if (ev, t) == ("removed", "cpu")) == 2
        assert sum(n for ev, t, n in seen if (ev, t) == ("removed", "disk")) == 2
        seen.clear()
        assert engine.remove(list(range(100, 132))) >= 2
        assert ("removed", "cpu", 2) in seen


def _resident_pages(view: memoryview) -> int:
    """Pages of ``view`` in memory (mincore), without touching them."""
    import ctypes
    import mmap as _mmap

    libc = ctypes.CDLL(None, use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    start = addr - addr % _mmap.PAGESIZE
    n = (addr + len(view) - start + _mmap.PAGESIZE - 1) // _mmap.PAGESIZE
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * _mmap.PAGESIZE), vec) == 0
    return sum(b & 1 for b in vec)


@pytest.mark.parametrize("prefault", [True, False])
def test_the_dram_tier_is_made_resident_at_start_unless_told_not_to(prefault):
    cfg = CacheConfig.from_dict(
        {"chunk_size": 16, "max_local_cpu_size": "8MiB", "local_cpu_prefault": prefault}
    )
    with CacheEngine(cfg, model="m", layout=LAYOUT) as engine:
        view = engine.pool.arena.view()
        resident = _resident_pages(view)
        pages = len(view) // 4096
        if prefault:
            assert resident >= pages - 1  # every page (the partial last one aside)
        else:
            assert resident < pages // 2  # untouched until stores need it


def test_a_dram_tier_the_machine_cannot_hold_says_what_to_lower(monkeypatch):
    import errno

    from lmcache_core.arena import AnonymousArena

    def no_memory(self):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(AnonymousArena, "prefault", no_memory)
    cfg = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "8MiB"})
    with pytest.raises(ConfigError, match="max_local_cpu_size=8.*local_cpu_prefault: false"):
        CacheEngine(cfg, model="m", layout=LAYOUT)
