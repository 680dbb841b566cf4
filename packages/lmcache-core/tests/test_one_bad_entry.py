"""Issue 32, items 3 and 5: one bad entry never takes out more than itself.

On a real redis-server: a value of another type (a LIST) under one chunk's name
is a miss of that chunk alone, counted and deleted, while untouched prompts keep
hitting; a LIST in place of a p2p peer record does not break lookups for good;
a 64 MiB value under a p2p index key or as a peer record is read bounded and
removed. The cases every frame store must pass are in the shipped hostile suite
(``lmcache_core.testing.hostile_tests``).
"""

from __future__ import annotations

import time
import tracemalloc
import uuid

import pytest

pytest.importorskip("redis")

from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.auth import SECRET_ENV, FrameSealer, IndexSigner
from lmcache_core.backends.p2p import Entry, PeerIndex
from lmcache_core.backends.p2p_index import MAX_ENTRY_BYTES, MAX_RECORD_BYTES
from lmcache_core.backends.redis import RedisBackend
from lmcache_core.metrics import Metrics
from lmcache_core.testing import ChunkFactory, chunk_payload, test_key
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_core.testing.servers import RedisServer
from lmcache_core.tier import ManagedTier

LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
)
SECRET = b"one-bad-entry-test-secret-0123456789"
BIG = 64 << 20


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as s:
        yield s


def _list_in_place(client, name: str) -> None:
    client.delete(name)
    client.rpush(name, b"not", b"a", b"value")


# ---------------------------------------------------------------------------- item 3: Redis


@pytest.mark.parametrize("secret", [None, SECRET], ids=["opted-out", "authenticated"])
def test_a_list_under_one_chunks_name_is_a_miss_of_that_chunk_alone(redis_server, secret):
    f = ChunkFactory(4096)
    metrics = Metrics()
    backend = RedisBackend(
        redis_server.url,
        key_prefix=f"list-{uuid.uuid4().hex[:8]}:",
        sealer=FrameSealer(secret) if secret else None,
        metrics=metrics,
        max_chunk_bytes=4096,
    )
    tier = ManagedTier(backend)
    made = [f.make(test_key(i), 4096) for i in range(3)]
    assert tier.put(made) == [True] * 3
    for c in made:
        c.release()
    tier.flush(10)
    name = backend.name_of(test_key(1))
    _list_in_place(backend.client, name)
    got = tier.get([test_key(i) for i in range(3)], f.allocate)
    assert got[1] is None
    assert [bytes(got[i].view) for i in (0, 2)] == [
        chunk_payload(test_key(i), 4096) for i in (0, 2)
    ]
    for c in got:
        if c is not None:
            c.release()
    assert tier.read_health.healthy, "one entry's type must not mark the read path failing"
    assert metrics.get("lmcache:num_corrupt_chunks", tier="redis") == 1
    assert metrics.get("lmcache:num_failures", tier="redis", op="get") == 0
    assert backend.client.exists(name) == 0, "the LIST is deleted"
    c = f.make(test_key(1), 4096)
    assert tier.put([c]) == [True]
    c.release()
    tier.flush(10)
    (again,) = tier.get([test_key(1)], f.allocate)
    assert again is not None and bytes(again.view) == chunk_payload(test_key(1), 4096)
    again.release()
    tier.close()


def test_an_untouched_prompt_keeps_hitting_beside_a_list_under_another_chunk(
    redis_server, monkeypatch
):
    """The reproduction: one LIST under one chunk's name made every read of the tier fail
    (0 of 196 hits for an untouched prompt in 20 s)."""
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    src, dst = PagedKVMemory(LAYOUT, seed=1), PagedKVMemory(LAYOUT, seed=2)
    damaged, untouched = list(range(64)), list(range(1000, 1064))
    cfg = CacheConfig.from_dict(
        {
            "chunk_size": 16,
            "max_local_cpu_size": "1MiB",
            "remote_url": redis_server.url,
            "tier_retry_backoff": 5,  # a failure would keep the tier off for the whole test
            "extra_config": {"redis_key_prefix": f"list-{uuid.uuid4().hex[:8]}:"},
        }
    )
    with CacheEngine(cfg, model="m", layout=LAYOUT) as engine:
        for i, toks in enumerate((damaged, untouched)):
            assert engine.store(toks, src.kv(src.table(64, i))) == 64
        assert engine.flush(10)
        redis = engine.tiers[1].backend
        bad = engine.keys(engine.spans(damaged))[2]
        _list_in_place(redis.client, redis.name_of(bad))
        hits = 0
        for _ in range(10):
            engine.cpu.remove(engine.keys(engine.spans(damaged + untouched)))
            engine.retrieve(damaged, dst.kv(dst.table(64, 3)))
            t = dst.table(64, 4)
            if engine.retrieve(untouched, dst.kv(t)) == 64:
                hits += 1
                assert dst.tokens_kv(t, 0, 64) == src.tokens_kv(src.table(64, 1), 0, 64)
        assert hits == 10
        assert engine.tiers[1].read_health.healthy
        assert engine.metrics.get("lmcache:num_corrupt_chunks", tier="redis") == 1
        assert redis.client.exists(redis.name_of(bad)) == 0


# ---------------------------------------------------------------------------- p2p index


@pytest.fixture
def index(redis_server):
    idx = PeerIndex(
        redis_server.url,
        prefix=f"idx-{uuid.uuid4().hex[:8]}:",
        signer=IndexSigner(SECRET),
        peer_ttl_s=30,
    )
    yield idx
    for name in idx.client.scan_iter(match=f"{idx.prefix}*"):
        idx.client.delete(name)


def _entry(peer: str, n: int) -> Entry:
    return Entry(peer, 4096 * n, 4096, 16, 8 * n, n)


@pytest.mark.parametrize("scripted", [True, False], ids=["script", "two-round-trips"])
def test_a_list_as_a_peer_record_does_not_break_lookups_for_good(index, scripted):
    if not scripted:
        index._script = False  # as on a server that refuses scripts
    keys = [test_key(i) for i in range(4)]
    index.publish([(keys[0], _entry("alive", 0)), (keys[1], _entry("victim", 1))])
    index.announce("alive", b"metadata of alive")
    index.announce("victim", b"metadata of victim")
    _list_in_place(index.client, index._peer("victim"))
    entries, peers = index.lookup_with_peers(keys, exclude="me")
    assert [e.peer if e else None for e in entries] == ["alive", "victim", None, None]
    assert peers == {"alive": b"metadata of alive", "victim": None}
    assert index.removed == 1 and index.client.exists(index._peer("victim")) == 0
    if scripted:
        assert index._script not in (None, False), "one bad record must not turn scripts off"
    # The owner's next heartbeat puts its record back: it is served again at once.
    index.announce("victim", b"metadata of victim")
    entries, peers = index.lookup_with_peers(keys, exclude="me")
    assert peers == {"alive": b"metadata of alive", "victim": b"metadata of victim"}
    assert index.removed == 1


@pytest.mark.parametrize("scripted", [True, False], ids=["script", "two-round-trips"])
def test_a_list_under_one_index_key_is_a_miss_of_that_key_alone(index, scripted):
    if not scripted:
        index._script = False
    keys = [test_key(i) for i in range(3)]
    index.publish([(k, _entry("alive", i)) for i, k in enumerate(keys)])
    index.announce("alive", b"metadata of alive")
    _list_in_place(index.client, index._chunk(keys[1]))
    entries, peers = index.lookup_with_peers(keys, exclude="me")
    assert [e.peer if e else None for e in entries] == ["alive", None, "alive"]
    assert peers == {"alive": b"metadata of alive"}
    assert index.client.exists(index._chunk(keys[1])) == 0 and index.removed == 1
    assert index.lookup(keys)[0] is not None  # the plain lookup too


@pytest.mark.parametrize("scripted", [True, False], ids=["script", "two-round-trips"])
@pytest.mark.parametrize("where", ["index key", "peer record"])
def test_a_64_mib_value_in_the_index_is_read_bounded_and_removed(index, scripted, where):
    if not scripted:
        index._script = False
    keys = [test_key(i) for i in range(3)]
    index.publish([(k, _entry("alive", i)) for i, k in enumerate(keys)])
    index.publish([(keys[2], _entry("victim", 2))])
    index.announce("alive", b"metadata of alive")
    name = index._chunk(keys[1]) if where == "index key" else index._peer("victim")
    index.client.set(name, b"\x00" * BIG)
    index.lookup_with_peers(keys[:1], exclude="me")  # the connection and script warm
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        entries, peers = index.lookup_with_peers(keys, exclude="me")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - t0
    assert peak < 4 * MAX_RECORD_BYTES, f"{peak} bytes allocated: the value was read whole"
    assert elapsed < 0.3, f"{elapsed:.2f} s"
    assert index.client.exists(name) == 0, "the out-of-bound value is removed"
    assert index.removed == 1
    if where == "index key":
        assert [e.peer if e else None for e in entries] == ["alive", None, "victim"]
    else:
        assert entries[1] is not None and peers.get("victim") is None
    # Gone: the next lookup reads a few bytes, and costs nothing more.
    index.lookup_with_peers(keys, exclude="me")
    assert index.removed == 1


def test_the_bounds_hold_what_the_index_writes():
    """An entry with the longest owner name and a checksum, and NIXL's metadata, fit."""
    signer = IndexSigner(SECRET)
    e = Entry("p" * 255, 2**63 - 1, 2**31, 2**31, 2**63 - 1, 2**63 - 1, "f" * 16)
    assert len(e.encode(test_key(0), signer)) < MAX_ENTRY_BYTES
    assert MAX_RECORD_BYTES >= 64 << 10


def test_the_tier_counts_and_logs_removed_index_values(redis_server, monkeypatch):
    """Through the p2p tier: what the index removed is counted as corrupt."""
    from lmcache_core.backends.p2p import P2PBackend
    from lmcache_core.pool import SlotPool

    class Loopback:
        name = "loopback"
        peer_id = "reader"

        def register(self, arena):
            pass

        def metadata(self):
            return b"reader"

        def connect(self, metadata):
            return metadata.decode()

        def read(self, peer, pairs, *, timeout):
            raise AssertionError("nothing is pulled: every entry is bad")

        def close(self):
            pass

    layout = KVLayout("vllm_flash", "bfloat16", 1, 2, 32, 16)
    pool = SlotPool.anonymous(4 * 4096, 4096)
    idx = PeerIndex(redis_server.url, prefix=f"tier-{uuid.uuid4().hex[:8]}:",
                    signer=IndexSigner(SECRET))  # fmt: skip
    tier = P2PBackend(Loopback(), idx, pool, timeout_s=1, layout=layout)
    try:
        idx.client.set(idx._chunk(test_key(1)), b"\x00" * (MAX_ENTRY_BYTES + 10))
        _list_in_place(idx.client, idx._chunk(test_key(2)))
        assert tier.contains([test_key(1), test_key(2)]) == [False, False]
        assert tier.metrics.get("lmcache:num_corrupt_chunks", tier="p2p") == 2
    finally:
        tier.close()
        pool.close()
