"""The Redis/Valkey tier against a real redis-server: contract, corruption, TLS, auth, cluster."""

from __future__ import annotations

import itertools
import uuid

import pytest
import redis as redis_py
from lmcache_core.auth import FrameSealer
from lmcache_core.backends.redis import RedisBackend, client_url
from lmcache_core.errors import ConfigError
from lmcache_core.metrics import Metrics
from lmcache_core.serdes.base import HEADER_SIZE
from lmcache_core.testing import (
    ChunkFactory,
    StorageBackendTests,
    backend_state_machine,
    chunk_payload,
    test_key,
)
from lmcache_core.testing.servers import RedisCluster, RedisServer, free_port


@pytest.fixture(scope="module")
def server():
    with RedisServer() as s:
        yield s


_servers: dict[str, RedisServer] = {}


def _shared_server() -> RedisServer:
    # The state machine builds backends outside fixtures: one server per session.
    if "s" not in _servers:
        _servers["s"] = RedisServer().start()
    return _servers["s"]


def teardown_module(module):
    for s in _servers.values():
        s.stop()


def _unique_backend(url: str, **kw) -> RedisBackend:
    """A backend with a key prefix of its own: an empty store for each test."""
    return RedisBackend(url, key_prefix=f"t-{uuid.uuid4().hex[:12]}:", **kw)


class TestRedisBackend(StorageBackendTests):
    @pytest.fixture(autouse=True)
    def _server(self, server):
        self.url = server.url

    def make_backend(self, capacity_bytes, slot_bytes):
        return _unique_backend(self.url, max_chunk_bytes=slot_bytes)

    def raw_get(self, backend, key):
        return backend.client.get(backend.name_of(key))

    def raw_set(self, backend, key, value):
        backend.client.set(backend.name_of(key), value)

    def raw_set_unusable(self, backend, key):
        name = backend.name_of(key)
        backend.client.delete(name)
        backend.client.rpush(name, b"not", b"a", b"frame")


SECRET = b"0123456789abcdef-test-secret"


class TestRedisBackendAuthenticated(TestRedisBackend):
    authenticated = True

    def make_backend(self, capacity_bytes, slot_bytes):
        return _unique_backend(self.url, max_chunk_bytes=slot_bytes, sealer=FrameSealer(SECRET))


class TestRedisBackendEncrypted(TestRedisBackend):
    authenticated = True

    def make_backend(self, capacity_bytes, slot_bytes):
        return _unique_backend(
            self.url, max_chunk_bytes=slot_bytes, sealer=FrameSealer(SECRET, encrypt=True)
        )


TestRedisBackendStateful = backend_state_machine(
    lambda cap, slot: _unique_backend(_shared_server().url, max_chunk_bytes=slot), max_examples=25
).TestCase


def _put(backend, f, ids, nbytes=4096):
    for i in ids:
        c = f.make(test_key(i), nbytes)
        assert backend.put([c]) == [True]
        c.release()


def _read(backend, f, i):
    (c,) = backend.get([test_key(i)], f.allocate)
    if c is None:
        return None
    data = bytes(c.view)
    c.release()
    return data


def test_two_instances_share_chunks(server):
    f = ChunkFactory(4096)
    a = RedisBackend(server.url, key_prefix="shared-test:")
    b = RedisBackend(f"valkey://127.0.0.1:{server.port}/0", key_prefix="shared-test:")
    _put(a, f, [1, 2])
    assert b.contains([test_key(1), test_key(2), test_key(3)]) == [True, True, False]
    assert _read(b, f, 2) == chunk_payload(test_key(2), 4096)
    assert a.used_bytes == 2 * 4096 and b.used_bytes == 0  # each counts its own writes
    a.remove([test_key(1), test_key(2)])


def test_corrupt_truncated_foreign_and_garbage_values_are_deleted_misses(server):
    f = ChunkFactory(4096)
    m = Metrics()
    b = _unique_backend(server.url, metrics=m)
    _put(b, f, range(5))
    raw = redis_py.Redis.from_url(server.url)
    n0, n1, n2, n3 = (b.name_of(test_key(i)) for i in range(4))
    raw.setrange(n0, HEADER_SIZE + 40 + 100, b"\xff\xfe")  # flipped payload bytes
    raw.set(n1, raw.get(n1)[:-10])  # truncated
    raw.set(n2, raw.get(n3))  # another key's (valid) frame
    raw.set(n3, b"pickle?" * 10)  # not a frame at all
    for i in range(4):
        assert _read(b, f, i) is None
    assert _read(b, f, 4) == chunk_payload(test_key(4), 4096)
    assert m.get("lmcache:num_corrupt_chunks", tier="redis") == 4
    assert raw.exists(n0, n1, n2, n3) == 0, "corrupt values are deleted for every instance"
    assert f.pool.free_slots == f.pool.num_slots


def test_a_value_claiming_more_bytes_than_a_chunk_is_refused(server):
    f = ChunkFactory(4096)
    big = ChunkFactory(8192)
    writer = _unique_backend(server.url)
    reader = RedisBackend(server.url, key_prefix=writer.name_prefix, max_chunk_bytes=4096)
    c = big.make(test_key(1), 8192)
    writer.put([c])
    c.release()
    assert _read(reader, f, 1) is None


def test_ttl_expires_values(server):
    import time

    f = ChunkFactory(4096)
    b = _unique_backend(server.url, ttl_s=0.2)
    _put(b, f, [1])
    assert b.contains([test_key(1)]) == [True]
    time.sleep(0.4)
    assert b.contains([test_key(1)]) == [False]


def test_password_from_url_and_from_environment(monkeypatch):
    f = ChunkFactory(4096)
    with RedisServer(password="s3cret") as s:
        b = _unique_backend(s.url)
        _put(b, f, [1])
        assert _read(b, f, 1) == chunk_payload(test_key(1), 4096)
        bare = f"redis://127.0.0.1:{s.port}"
        with pytest.raises(redis_py.AuthenticationError):
            _unique_backend(bare).contains([test_key(1)])
        monkeypatch.setenv("LMCACHE_REDIS_PASSWORD", "s3cret")
        env_b = RedisBackend(bare, key_prefix=b.name_prefix)
        assert _read(env_b, f, 1) == chunk_payload(test_key(1), 4096)


def test_tls_rediss():
    f = ChunkFactory(4096)
    with RedisServer(tls=True) as s:
        url = f"{s.url}?ssl_ca_certs={s.ca_file}"
        b = _unique_backend(url)
        _put(b, f, [1, 2])
        assert _read(b, f, 2) == chunk_payload(test_key(2), 4096)
        plain = _unique_backend(f"redis://127.0.0.1:{s.port}", connect_timeout_s=1, timeout_s=1)
        with pytest.raises(redis_py.ConnectionError):
            plain.contains([test_key(1)])


def test_redis_cluster():
    f = ChunkFactory(4096)
    with RedisCluster() as cluster:
        b = _unique_backend(cluster.url)
        ids = range(40)  # spread over every node's hash slots
        _put(b, f, ids)
        assert b.contains([test_key(i) for i in ids]) == [True] * 40
        got = b.get([test_key(i) for i in ids], f.allocate)
        for i, c in zip(ids, got):
            assert bytes(c.view) == chunk_payload(test_key(i), 4096)
            c.release()
        assert set(itertools.islice(b.keys(), 100)) <= {test_key(i) for i in ids}
        assert b.remove([test_key(i) for i in range(10)]) == 10
        assert b.contains([test_key(0), test_key(10)]) == [False, True]


@pytest.mark.parametrize(
    "url, fix",
    [
        ("memcached://h:1", "scheme must be one of"),
        ("redis://", "has no host"),
        ("redis://h:notaport", "invalid port"),
    ],
)
def test_bad_urls_say_what_to_fix(url, fix):
    with pytest.raises(ConfigError, match=fix):
        client_url(url)


def test_urls_map_to_the_client():
    assert client_url("valkeys://h:1/2") == ("rediss://h:1/2", False)
    assert client_url("redis+cluster://h:7000") == ("redis://h:7000", True)


def test_missing_client_library_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigError, match=r"pip install 'lmcache\[redis\]'"):
        RedisBackend("redis://127.0.0.1:1")


def test_a_put_that_fails_midway_leaves_the_connection_clean(server, monkeypatch):
    """Writes stream (frame i sent while i+1 is encoded): a failure midway raises from
    put(), the frames sent before it are stored, and the next calls on the same backend
    read their own answers (no unread reply left on a pooled connection)."""
    f = ChunkFactory(4096)
    b = _unique_backend(server.url, max_chunk_bytes=4096, sealer=FrameSealer(SECRET))
    b.send_batch_bytes = 1  # every frame sent on its own (small frames are sent together)
    real_encode = b._encode
    encoded = []

    def encode(chunk):
        encoded.append(chunk.key)
        if len(encoded) == 3:
            raise MemoryError("encoding failed")
        return real_encode(chunk)

    monkeypatch.setattr(b, "_encode", encode)
    made = [f.make(test_key(i), 4096) for i in range(5)]
    try:
        with pytest.raises(MemoryError):
            b.put(made)
        assert len(encoded) == 3  # nothing after the failure was encoded or sent
        assert b.contains([test_key(i) for i in range(5)]) == [True, True, False, False, False]
        monkeypatch.setattr(b, "_encode", real_encode)
        assert b.put(made[2:]) == [True] * 3
        for i in range(5):
            (c,) = b.get([test_key(i)], f.allocate)
            assert c is not None and bytes(c.view) == chunk_payload(test_key(i), 4096)
            c.release()
    finally:
        for c in made:
            c.release()
        b.close()
        f.close()


def test_upstream_valkey_settings_in_extra_config():
    """Upstream's Valkey recipe: credentials and database in extra_config, node-list URLs."""
    from lmcache_core.backends.base import BackendContext
    from lmcache_core.config import CacheConfig
    from lmcache_core.layout import KVLayout
    from lmcache_core.pool import SlotPool

    f = ChunkFactory(4096)
    layout = KVLayout(
        kind="vllm_flash", dtype="bfloat16", num_layers=1, num_kv_heads=1, head_size=8, block_size=4
    )
    with RedisServer(password="s3cret") as s:
        other = f"127.0.0.1:{free_port()}"
        extra = {
            "valkey_username": "default",
            "valkey_password": "s3cret",
            "valkey_database": 3,
            "redis_key_prefix": f"up-{uuid.uuid4().hex[:6]}:",
        }
        config = CacheConfig.from_dict(
            {"remote_url": f"valkey://127.0.0.1:{s.port}, {other}", "extra_config": extra}
        )
        ctx = BackendContext(
            layout=layout, pool=SlotPool.anonymous(1 << 20, 8192), metrics=Metrics(), secret=SECRET
        )
        b = RedisBackend.from_config(config, ctx)
        _put(b, f, [1])
        assert _read(b, f, 1) == chunk_payload(test_key(1), 4096)
        assert b.client.connection_pool.connection_kwargs["db"] == 3
        raw = redis_py.Redis(port=s.port, password="s3cret", db=3)
        assert raw.exists(b.name_of(test_key(1)))
        with pytest.raises(ConfigError, match="valkey_mode"):
            RedisBackend.from_config(
                config.replace(extra_config={**extra, "valkey_mode": "sentinel"}), ctx
            )
