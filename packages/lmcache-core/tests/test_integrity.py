"""Regression tests of the integrity review: each asserts the fixed behaviour of one finding.

Real files, a real redis-server, the real engine; the hostile values every
backend must survive are in the shipped suite (``lmcache_core.testing.hostile_tests``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import pytest
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.auth import SECRET_ENV, FrameSealer, IndexSigner, load_secret
from lmcache_core.backends.disk import LocalDiskBackend
from lmcache_core.backends.frame_store import Oversized
from lmcache_core.backends.fs import SharedFSBackend
from lmcache_core.backends.redis import RedisBackend
from lmcache_core.errors import ConfigError
from lmcache_core.metrics import Metrics
from lmcache_core.serdes.naive import NaiveSerde
from lmcache_core.testing import ChunkFactory, chunk_payload, test_key
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_core.testing.servers import RedisServer
from lmcache_core.tier import ManagedTier

LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
)
SECRET = b"integrity-test-secret-0123456789"


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as s:
        yield s


def _redis(url: str, **kw) -> RedisBackend:
    return RedisBackend(url, key_prefix=f"i-{uuid.uuid4().hex[:10]}:", **kw)


def _put(backend, f, ids, nbytes=4096):
    made = [f.make(test_key(i), nbytes) for i in ids]
    assert backend.put(made) == [True] * len(made)
    for c in made:
        c.release()


def _read(backend, f, i):
    (c,) = backend.get([test_key(i)], f.allocate)
    if c is None:
        return None
    data = bytes(c.view)
    c.release()
    return data


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------- finding 4


def test_redis_never_reads_more_than_a_frame_can_be(redis_server):
    """A 64 MiB value under a 2 KiB chunk's key: at most limit + 1 bytes come back."""
    f = ChunkFactory(2048)
    b = _redis(redis_server.url, max_chunk_bytes=2048)
    b.client.set(b.name_of(test_key(1)), b"\x00" * (64 << 20))
    (value,) = b._read([b.name_of(test_key(1))], b.max_value_bytes)
    assert isinstance(value, Oversized) and value.nbytes == b.max_value_bytes + 1
    assert _read(b, f, 1) is None
    assert b.client.exists(b.name_of(test_key(1))) == 0  # deleted
    assert b.metrics.get("lmcache:num_corrupt_chunks", tier="redis") == 1
    b.close()


def test_shared_fs_stats_before_reading(tmp_path):
    f = ChunkFactory(2048)
    b = SharedFSBackend(tmp_path, max_chunk_bytes=2048)
    path = tmp_path / b.name_of(test_key(1))
    path.parent.mkdir(parents=True)
    with open(path, "wb") as fh:  # a 256 MiB sparse file: reading it would cost 256 MiB
        fh.truncate(256 << 20)
    before = _rss_kib()
    assert isinstance(b._read([b.name_of(test_key(1))], b.max_value_bytes)[0], Oversized)
    assert _read(b, f, 1) is None
    assert _rss_kib() - before < 32 << 10
    assert not path.exists()
    # A symlink in a chunk's place is not followed, and a directory does not raise.
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * 100)
    link = tmp_path / b.name_of(test_key(2))
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    assert _read(b, f, 2) is None
    assert outside.exists()
    (tmp_path / b.name_of(test_key(3))).mkdir(parents=True)
    assert _read(b, f, 3) is None


# ---------------------------------------------------------------------------- finding 5


def test_disk_chunk_larger_than_a_slot_is_dropped_not_a_tier_failure(tmp_path):
    f = ChunkFactory(4096)
    disk = LocalDiskBackend(tmp_path, 1 << 20, max_chunk_bytes=4096)
    tier = ManagedTier(disk)
    _put(disk, f, [0, 1])
    # Grow chunk 0's file past a slot and fix its index entry to match (an
    # operator copying another cache's files in): the allocator would refuse it.
    path = disk._path(test_key(0))
    path.write_bytes(path.read_bytes() + b"\x01" * 8192)
    disk._index[test_key(0)] += 8192
    assert tier.get([test_key(0)], f.allocate) == [None]
    assert tier.read_health.healthy
    assert not path.exists()
    assert tier.get([test_key(1)], f.allocate)[0] is not None


def test_disk_start_ignores_sparse_giants_directories_and_symlinks(tmp_path):
    root = tmp_path / "cache"
    f = ChunkFactory(4096)
    ns = test_key(0).namespace
    disk = LocalDiskBackend(root, 1 << 20, namespace=ns, max_chunk_bytes=4096)
    _put(disk, f, [0])
    giant = disk._path(test_key(5))
    giant.parent.mkdir(parents=True, exist_ok=True)
    with open(giant, "wb") as fh:
        fh.truncate(1 << 40)  # 1 TiB, sparse
    (disk._path(test_key(6))).mkdir(parents=True)
    # A folder symlinked into the cache holding a temp-named file of someone else's.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / ".victim.chunk.tmp-1-1"
    victim.write_bytes(b"keep me")
    (root / ns.hex() / "zz").symlink_to(elsewhere, target_is_directory=True)
    again = LocalDiskBackend(root, 1 << 20, namespace=ns, max_chunk_bytes=4096)
    assert again.used_bytes == 4096
    assert set(again.keys()) == {test_key(0)}
    assert not giant.exists()
    assert victim.exists()
    assert _read(again, f, 6) is None  # the directory: a miss, nothing raised


# ---------------------------------------------------------------------------- finding 6


def test_short_frame_with_valid_checksum_is_removed_and_replaced(redis_server, monkeypatch):
    """The engine checks a chunk's size against its span: a short one is a miss, removed
    (even sealed under the deployment's own secret: a holder of it wrote a bad frame)."""
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    src, dst = PagedKVMemory(LAYOUT, seed=1), PagedKVMemory(LAYOUT, seed=2)
    tokens = list(range(64))
    url = redis_server.url
    prefix = f"short-{uuid.uuid4().hex[:8]}:"
    cfg = CacheConfig.from_dict(
        {
            "chunk_size": 16,
            "max_local_cpu_size": "1MiB",
            "remote_url": url,
            "extra_config": {"redis_key_prefix": prefix},
        }
    )
    with CacheEngine(cfg, model="m", layout=LAYOUT) as engine:
        keys = engine.keys(engine.spans(tokens))
        redis = engine.tiers[1].backend
        half = LAYOUT.chunk_bytes(8)
        frame = NaiveSerde().encode(keys[0].to_bytes(), 8, memoryview(b"\x07" * half))
        sealed = redis.sealer.seal(keys[0].to_bytes(), list(frame))
        redis.client.set(redis.name_of(keys[0]), b"".join(bytes(p) for p in sealed))
        assert engine.retrieve(tokens, dst.kv(dst.table(64, 0))) == 0
        assert engine.cpu.contains([keys[0]]) == [False]  # never promoted
        assert redis.client.exists(redis.name_of(keys[0])) == 0  # removed from the tier
        assert engine.metrics.get("lmcache:num_corrupt_chunks", tier="redis") == 1
        assert engine.store(tokens, src.kv(src.table(64, 0))) == 64  # a fresh store replaces it
        engine.flush(10)
        t = dst.table(64, 3)
        assert engine.retrieve(tokens, dst.kv(t)) == 64
        assert dst.tokens_kv(t, 0, 64) == src.tokens_kv(src.table(64, 0), 0, 64)


# ---------------------------------------------------------------------------- finding 7


def test_ranks_sharing_a_disk_touch_only_their_own_namespace(tmp_path):
    f = ChunkFactory(4096)
    ns0, ns1 = b"\x00" * 16, b"\x01" * 16
    k0 = type(test_key(0)).of(ns0, b"a" * 32)
    k1 = type(test_key(0)).of(ns1, b"b" * 32)
    r0 = LocalDiskBackend(tmp_path, 1 << 20, namespace=ns0)
    r1 = LocalDiskBackend(tmp_path, 1 << 20, namespace=ns1)
    for backend, key in ((r0, k0), (r1, k1)):
        c = f.make(key)
        backend.put([c])
        c.release()
    # Rank 1 writing a chunk right now (its temp file) while rank 0 restarts with a tiny bound.
    live_tmp = r1._path(k1).parent / f".x.chunk.tmp-{os.getppid()}-7"
    live_tmp.write_bytes(b"in flight")
    restarted = LocalDiskBackend(tmp_path, 4096, namespace=ns0)
    assert set(restarted.keys()) == {k0}
    assert r1._path(k1).exists()  # never evicted or indexed by the other rank
    assert live_tmp.exists()  # its writer is alive: left alone


def test_engines_of_two_ranks_index_only_their_own_files(tmp_path):
    src = PagedKVMemory(LAYOUT, seed=1)
    tokens = list(range(32))
    cfg = CacheConfig.from_dict(
        {
            "chunk_size": 16,
            "max_local_cpu_size": "1MiB",
            "local_disk": str(tmp_path),
            "max_local_disk_size": "1MiB",
        }
    )
    engines = [CacheEngine(cfg, model="m", layout=LAYOUT, world_size=2, rank=r) for r in (0, 1)]
    for e in engines:
        e.store(tokens, src.kv(src.table(32, 0)))
        e.flush(10)
        e.close()
    again = CacheEngine(cfg, model="m", layout=LAYOUT, world_size=2, rank=0)
    disk = again.tiers[1].backend
    assert len(list(disk.keys())) == 2
    assert all(k.namespace == again.namespace.digest for k in disk.keys())
    again.close()


# ---------------------------------------------------------------------------- finding 8


class _HangingBackend(LocalDiskBackend):
    release = threading.Event()

    def put(self, chunks):
        self.release.wait(30)
        return super().put(chunks)


def test_remove_is_bounded_while_a_write_hangs(tmp_path):
    f = ChunkFactory(4096)
    backend = _HangingBackend(tmp_path, 1 << 20)
    tier = ManagedTier(backend, write_behind_bytes=1 << 20, timeout_s=0.3)
    c = f.make(test_key(0))
    tier.put([c])
    c.release()
    time.sleep(0.1)  # the write is in flight, hanging
    t0 = time.monotonic()
    tier.remove([test_key(0)])
    assert time.monotonic() - t0 < 2.0
    _HangingBackend.release.set()
    assert tier.flush(10)
    assert backend.contains([test_key(0)]) == [False]  # removed once the write landed
    tier.close()


# ---------------------------------------------------------------------------- finding 3


def test_secret_comes_from_env_or_file_never_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert load_secret(CacheConfig()) is None
    with pytest.raises(ConfigError, match="never put the secret in the cache config"):
        CacheConfig.from_dict({"auth_secret": "hunter2hunter2hunter2"})
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    assert load_secret(CacheConfig(auth_secret_file=str(path))) == SECRET
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    assert load_secret(CacheConfig()) == SECRET
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret(CacheConfig())
    monkeypatch.setenv(SECRET_ENV, "another-deployment-secret-0123456789")
    with pytest.raises(ConfigError, match="different secrets"):
        load_secret(CacheConfig(auth_secret_file=str(path)))
    with pytest.raises(ConfigError, match="auth_secret_file"):
        load_secret(CacheConfig(auth_secret_file=str(tmp_path / "missing")))


def test_shared_tier_without_a_secret_refuses_to_start_unless_opted_out(
    redis_server, monkeypatch, caplog
):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    cfg = CacheConfig.from_dict(
        {"chunk_size": 16, "max_local_cpu_size": "1MiB", "remote_url": redis_server.url}
    )
    # The safe default: no secret, no shared tier; the message says how to set one.
    with pytest.raises(ConfigError) as e:
        CacheEngine(cfg, model="m", layout=LAYOUT)
    text = str(e.value)
    assert "has no deployment secret" in text, text
    assert SECRET_ENV in text and "auth_secret_file" in text and "openssl rand" in text, text
    assert "allow_unauthenticated_shared_tiers: true" in text, text
    # The documented opt-out (single-tenant test setups): it runs, warns and says so.
    with caplog.at_level(logging.WARNING):
        engine = CacheEngine(
            cfg.replace(allow_unauthenticated_shared_tiers=True), model="m", layout=LAYOUT
        )
    assert "NOT authenticated" in caplog.text
    assert engine.metrics.get("lmcache:tier_authenticated", tier="redis") == 0
    engine.close()
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    engine = CacheEngine(cfg.replace(remote_encryption=True), model="m", layout=LAYOUT)
    assert engine.metrics.get("lmcache:tier_authenticated", tier="redis") == 1
    assert engine.tiers[1].backend.sealer.encrypt
    engine.close()
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(ConfigError, match="has no deployment secret"):
        CacheEngine(cfg.replace(remote_encryption=True), model="m", layout=LAYOUT)
    # The opt-out never covers encryption: it cannot be had without the secret.
    opted_out = cfg.replace(remote_encryption=True, allow_unauthenticated_shared_tiers=True)
    with pytest.raises(ConfigError, match="remote_encryption needs"):
        CacheEngine(opted_out, model="m", layout=LAYOUT)


def test_forged_frame_is_a_counted_miss_and_removed_and_no_secret_leaves_sealed_frames(
    redis_server,
):
    f = ChunkFactory(4096)
    prefix = f"forge-{uuid.uuid4().hex[:8]}:"
    sealed = RedisBackend(redis_server.url, key_prefix=prefix, sealer=FrameSealer(SECRET))
    _put(sealed, f, [1, 2])
    # Anyone with write access makes a frame with a valid xxh3 of other KV.
    forged = NaiveSerde().encode(test_key(1).to_bytes(), 16, memoryview(b"\xee" * 4096))
    sealed.client.set(sealed.name_of(test_key(1)), b"".join(bytes(p) for p in forged))
    assert _read(sealed, f, 1) is None
    assert sealed.metrics.get("lmcache:num_forged_chunks", tier="redis") == 1
    assert sealed.client.exists(sealed.name_of(test_key(1))) == 0
    # Another secret's frames do not verify either.
    other = RedisBackend(redis_server.url, key_prefix=prefix, sealer=FrameSealer(b"x" * 32))
    assert _read(other, f, 2) is None
    _put(sealed, f, [2])
    # An instance without the secret misses, and leaves the authentic frames alone.
    plain = RedisBackend(redis_server.url, key_prefix=prefix)
    _put(sealed, f, [3])
    assert _read(plain, f, 3) is None
    assert plain.client.exists(plain.name_of(test_key(3))) == 1
    assert _read(sealed, f, 3) == chunk_payload(test_key(3), 4096)


def test_encrypted_frames_hold_no_plaintext(redis_server):
    f = ChunkFactory(4096)
    b = RedisBackend(
        redis_server.url,
        key_prefix=f"enc-{uuid.uuid4().hex[:8]}:",
        sealer=FrameSealer(SECRET, encrypt=True),
    )
    _put(b, f, [1])
    raw = b.client.get(b.name_of(test_key(1)))
    payload = chunk_payload(test_key(1), 4096)
    assert payload[:64] not in raw and payload[2000:2064] not in raw
    assert _read(b, f, 1) == payload


def test_index_tags_bind_every_field():
    signer = IndexSigner(SECRET)
    tag = signer.tag(b"entry", b"key", b"owner", b"123")
    assert signer.check(tag, b"entry", b"key", b"owner", b"123")
    assert not signer.check(tag, b"entry", b"key2", b"owner", b"123")
    assert not signer.check(tag, b"entry", b"key", b"owner", b"124")
    assert not signer.check(tag, b"peer", b"key", b"owner", b"123")
    # Field boundaries are part of the tag: ("ab", "c") is not ("a", "bc").
    assert signer.tag(b"e", b"ab", b"c") != signer.tag(b"e", b"a", b"bc")
    assert not IndexSigner(b"y" * 32).check(tag, b"entry", b"key", b"owner", b"123")
    assert Metrics().get("lmcache:num_forged_chunks") == 0
