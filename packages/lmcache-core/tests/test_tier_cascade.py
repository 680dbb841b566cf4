"""The cache engine over real tiers: CPU -> disk -> Redis, with faults.

Real files, a real redis-server, kill -9, a full filesystem, corrupted bytes
and many threads: requests never fail, and every byte written back equals the
byte stored.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid

import pytest
import redis as redis_py
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.pool import SlotPool
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_core.testing.servers import RedisServer
from lmcache_core.tier import ManagedTier

LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=16, block_size=4
)
CHUNK = 16
CHUNK_BYTES = LAYOUT.chunk_bytes(CHUNK)  # 4 KiB
#: The deployment secret a production setup of a shared tier has (it refuses to start without).
SECRET = "tier-cascade-test-secret-0123456789abcdef"


@pytest.fixture(autouse=True)
def _deployment_secret(monkeypatch):
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", SECRET)


def make_engine(**cfg) -> CacheEngine:
    base = {
        "chunk_size": CHUNK,
        "max_local_cpu_size": f"{16 * CHUNK_BYTES}B",
        "tier_retry_backoff": 0.05,
        "tier_retry_max_backoff": 0.2,
        "blocking_timeout_secs": 2,
        "extra_config": {"redis_key_prefix": f"t-{uuid.uuid4().hex[:8]}:"},
    }
    base.update(cfg)
    return CacheEngine(CacheConfig.from_dict(base), model="test/model", layout=LAYOUT)


def disk_and_redis(disk: object, redis_url: str, prefix: str) -> dict:
    """Config for CPU -> a local disk -> Redis, under its own Redis key prefix."""
    return {
        "local_disk": str(disk),
        "max_local_disk_size": "1MiB",
        "remote_url": redis_url,
        "extra_config": {"redis_key_prefix": prefix},
    }


def prompt(i: int, ntok: int = 4 * CHUNK) -> list[int]:
    return [i * 1000 + t for t in range(ntok)]


def check_hit(engine: CacheEngine, src: PagedKVMemory, tokens, table_seed: int) -> int:
    """Retrieve ``tokens`` into fresh memory; assert the bytes; return tokens hit."""
    dst = PagedKVMemory(LAYOUT, seed=99)
    t_dst = dst.table(len(tokens), 5)
    got = engine.retrieve(tokens, dst.kv(t_dst))
    if got:
        expect = src.tokens_kv(src.table(len(tokens), table_seed), 0, got)
        assert dst.tokens_kv(t_dst, 0, got) == expect, "retrieved KV differs from stored KV"
    return got


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as s:
        yield s


def test_lower_tiers_serve_after_dram_is_gone_and_promote(tmp_path, redis_server):
    src = PagedKVMemory(LAYOUT)
    toks = prompt(1)
    table = src.table(len(toks), 1)
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    cfg = disk_and_redis(tmp_path, redis_server.url, prefix)
    with make_engine(**cfg) as first:
        assert first.store(toks, src.kv(table)) == len(toks)
        assert first.flush(10)
        assert [t.name for t in first.tiers] == ["cpu", "disk", "redis"]
        assert all(isinstance(t, ManagedTier) for t in first.tiers[1:])

    # A new process with the same disk: hits from disk, promoted to DRAM.
    with make_engine(**cfg) as second:
        assert second.lookup(toks) == len(toks)
        assert check_hit(second, src, toks, 1) == len(toks)
        assert second.metrics.get("lmcache:num_promotions", tier="disk") == 4
        assert second.cpu.contains(second.keys(second.spans(toks))) == [True] * 4

    # Another host (no disk of its own): hits from Redis.
    with make_engine(remote_url=redis_server.url, extra_config={"redis_key_prefix": prefix}) as e:
        assert e.lookup(toks) == len(toks)
        assert check_hit(e, src, toks, 1) == len(toks)
        assert e.metrics.get("lmcache:num_promotions", tier="redis") == 4


def test_store_never_waits_for_a_hung_tier_and_drops_when_full(redis_server):
    src = PagedKVMemory(LAYOUT)
    with make_engine(
        remote_url=redis_server.url, write_behind_queue_size=f"{2 * CHUNK_BYTES}B"
    ) as engine:
        redis_server.proc.send_signal(__import__("signal").SIGSTOP)  # hung, not dead
        try:
            t0 = time.monotonic()
            for i in range(6):
                toks = prompt(i)
                engine.store(toks, src.kv(src.table(len(toks), i)))
            assert time.monotonic() - t0 < 1.5, "stores waited for a hung tier"
            assert engine.metrics.get("lmcache:num_dropped_writes", tier="redis") > 0
            # DRAM still serves everything stored.
            assert check_hit(engine, src, prompt(5), 5) == 4 * CHUNK
        finally:
            redis_server.proc.send_signal(__import__("signal").SIGCONT)


def test_redis_killed_mid_run_then_restarted(tmp_path):
    src = PagedKVMemory(LAYOUT)
    errors: list[BaseException] = []
    with RedisServer() as server:
        # A DRAM tier of 4 chunks: most hits must come from Redis.
        with make_engine(remote_url=server.url, max_local_cpu_size=f"{4 * CHUNK_BYTES}B") as engine:
            stop = threading.Event()

            def traffic() -> None:
                i = 0
                while not stop.is_set():
                    toks = prompt(i % 8)
                    try:
                        engine.store(toks, src.kv(src.table(len(toks), i % 8)))
                        check_hit(engine, src, toks, i % 8)
                    except BaseException as e:  # any escape is a failed request
                        errors.append(e)
                        return
                    i += 1

            t = threading.Thread(target=traffic)
            t.start()
            time.sleep(0.5)
            server.kill()
            time.sleep(0.7)
            assert not engine.tiers[1].healthy
            server.start()  # same port, empty: a restarted cache
            time.sleep(0.5)
            stop.set()
            t.join(10)
            assert not errors, errors
            assert engine.metrics.get("lmcache:num_failures", tier="redis") >= 1
            # After it is back, stores reach Redis again and hits from it resume
            # (within a few backoff periods: a write or read path may still be
            # waiting out its backoff when the first request comes).
            hit = 0
            for attempt in range(20):
                toks = prompt(77 + attempt)
                engine.store(toks, src.kv(src.table(len(toks), 77 + attempt)))
                assert engine.flush(5)
                engine.cpu.remove(engine.keys(engine.spans(toks)))
                hit = check_hit(engine, src, toks, 77 + attempt)
                if hit == len(toks):
                    break
                time.sleep(0.1)
            assert hit == len(toks), "hits from Redis did not resume after its restart"
            assert engine.tiers[1].healthy


def test_corrupted_bytes_on_disk_and_in_redis_are_misses_never_wrong_kv(tmp_path, redis_server):
    src = PagedKVMemory(LAYOUT)
    toks = prompt(3)
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    cfg = disk_and_redis(tmp_path, redis_server.url, prefix)
    with make_engine(**cfg) as e:
        e.store(toks, src.kv(src.table(len(toks), 3)))
        assert e.flush(10)
        keys = e.keys(e.spans(toks))
        disk, redis_tier = e.tiers[1].backend, e.tiers[2].backend
    # Chunk 1 corrupt on disk, chunk 2 corrupt in Redis and on disk.
    for k in (keys[1], keys[2]):
        p = disk._path(k)
        data = bytearray(p.read_bytes())
        data[-7] ^= 0x10
        p.write_bytes(data)
    raw = redis_py.Redis.from_url(redis_server.url)
    name = redis_tier.name_of(keys[2])
    v = bytearray(raw.get(name))
    v[-3] ^= 0x01
    raw.set(name, bytes(v))
    with make_engine(**cfg) as e:
        # Chunk 1 is bad on disk but good in Redis: still a full hit.
        # Chunk 2 is bad everywhere: the hit stops before it.
        assert check_hit(e, src, toks, 3) == 2 * CHUNK
        assert e.metrics.get("lmcache:num_corrupt_chunks", tier="disk") == 2
        # Redis is authenticated: a flipped bit fails the frame's MAC (forged, deleted).
        assert e.metrics.get("lmcache:num_forged_chunks", tier="redis") == 1
        assert not raw.exists(name)


@contextlib.contextmanager
def tiny_filesystem(path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if r.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def test_disk_full_is_a_counted_miss_and_the_tier_keeps_working(tmp_path):
    src = PagedKVMemory(LAYOUT)
    with tiny_filesystem(tmp_path / "small", "64k") as small:
        # The bound says 1 MiB, the filesystem holds 64 KiB.
        with make_engine(local_disk=str(small), max_local_disk_size="1MiB") as e:
            for i in range(12):  # 12 x 4 chunks x 4 KiB = 192 KiB
                toks = prompt(i)
                assert e.store(toks, src.kv(src.table(len(toks), i))) == len(toks)
                e.flush(10)
            disk_tier = e.tiers[1]
            assert e.metrics.get("lmcache:num_failures", tier="disk", op="put") >= 1
            assert disk_tier.backend.capacity < 1 << 20, "the bound was lowered to fit"
            time.sleep(0.25)  # past the backoff: writes are tried again
            toks = prompt(50)
            e.store(toks, src.kv(src.table(len(toks), 50)))
            assert e.flush(10)
            assert disk_tier.contains(e.keys(e.spans(toks))) == [True] * 4
            e.cpu.remove(e.keys(e.spans(toks)))
            assert check_hit(e, src, toks, 50) == len(toks)


def test_many_threads_through_all_tiers_never_see_wrong_bytes(tmp_path, redis_server):
    src = PagedKVMemory(LAYOUT, num_blocks=256)
    errors: list[str] = []
    hits = [0]
    cfg = {
        "local_disk": str(tmp_path),
        "max_local_disk_size": f"{24 * CHUNK_BYTES}B",  # small: the disk tier evicts too
        "remote_url": redis_server.url,
        "max_local_cpu_size": f"{8 * CHUNK_BYTES}B",
    }
    with make_engine(**cfg) as engine:
        deadline = time.monotonic() + 3.0

        def worker(seed: int) -> None:
            import random

            rnd = random.Random(seed)
            while time.monotonic() < deadline and not errors:
                i = rnd.randrange(20)
                toks = prompt(i, rnd.choice([CHUNK, 2 * CHUNK, 4 * CHUNK]))
                try:
                    if rnd.random() < 0.4:
                        engine.store(toks, src.kv(src.table(4 * CHUNK, i)))
                    else:
                        dst = PagedKVMemory(LAYOUT, num_blocks=32, seed=seed)
                        t_dst = dst.table(len(toks), seed)
                        got = engine.retrieve(toks, dst.kv(t_dst))
                        if got:
                            hits[0] += 1
                            want = src.tokens_kv(src.table(4 * CHUNK, i), 0, got)
                            if dst.tokens_kv(t_dst, 0, got) != want:
                                errors.append(f"wrong bytes for prompt {i}")
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:5]
        assert hits[0] > 20
        assert engine.metrics.get("lmcache:num_corrupt_chunks") == 0


def test_a_chunk_evicted_from_dram_is_demoted_to_disk_when_missing_there(tmp_path):
    src = PagedKVMemory(LAYOUT)
    with make_engine(
        local_disk=str(tmp_path),
        max_local_disk_size="1MiB",
        max_local_cpu_size=f"{8 * CHUNK_BYTES}B",
    ) as e:
        first = prompt(1)
        e.store(first, src.kv(src.table(len(first), 1)))
        assert e.flush(10)
        keys = e.keys(e.spans(first))
        e.tiers[1].remove(keys)  # as if its write had been dropped
        for i in range(2, 5):  # fill DRAM: the first prompt's chunks are evicted
            toks = prompt(i)
            e.store(toks, src.kv(src.table(len(toks), i)))
        assert e.flush(10)
        assert e.metrics.get("lmcache:num_demotions", tier="disk") >= 1
        assert not all(e.cpu.contains(keys))
        demoted = [k for k, ok in zip(keys, e.tiers[1].contains(keys)) if ok]
        assert demoted, "no evicted chunk reached the disk"
        # Read into a pool of its own: the engine's may be full of DRAM chunks.
        reader = SlotPool.anonymous(len(demoted) * e.pool.slot_bytes, e.pool.slot_bytes)
        got = e.tiers[1].get(demoted, reader.allocate)
        for k, c in zip(demoted, got):
            i = keys.index(k)
            assert bytes(c.view) == src.tokens_kv(
                src.table(len(first), 1), i * CHUNK, (i + 1) * CHUNK
            )
            c.release()


def test_hit_sources_say_which_kind_of_tier_holds_each_found_chunk(tmp_path, redis_server):
    """What an engine adapter reports per tier (vLLM: prompt_tokens_cached_by_source),
    answered from memory: DRAM, then the local disk, else the remote kind configured."""
    src = PagedKVMemory(LAYOUT)
    toks = prompt(3)
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    cfg = disk_and_redis(tmp_path, redis_server.url, prefix)
    with make_engine(**cfg) as e:
        assert e.store(toks, src.kv(src.table(len(toks), 3))) == len(toks)
        assert e.flush(10)
        keys = e.keys(e.spans(toks))
        assert e.lookup(toks, pin_owner="a") == len(toks)
        assert e.hit_sources("a") == ["host"] * 4
        e.unpin("a")
        assert e.hit_sources("a") == [], "an unpinned owner's lookup is forgotten"
        e.cpu.remove(keys[2:])  # out of DRAM: on disk (and in Redis)
        assert e.lookup(toks, pin_owner="b") == len(toks)
        assert e.hit_sources("b") == ["host", "host", "disk", "disk"]
        disk = e.tiers[1]
        disk.remove([keys[3]])  # only Redis has it now
        assert e.lookup(toks, pin_owner="c") == len(toks)
        assert e.hit_sources("c") == ["host", "host", "disk", "remote"]
    # A process with Redis alone: every chunk is remote.
    with make_engine(remote_url=redis_server.url, extra_config={"redis_key_prefix": prefix}) as e:
        assert e.lookup(toks, pin_owner="d") == len(toks)
        assert e.hit_sources("d") == ["remote"] * 4
