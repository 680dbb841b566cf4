"""The S3 tier against moto's real S3 server, and the shared-filesystem tier on real files."""

from __future__ import annotations

import uuid

import pytest
from lmcache_core.auth import FrameSealer
from lmcache_core.backends.fs import SharedFSBackend, fs_path
from lmcache_core.backends.s3 import S3Backend, parse_s3_location, parse_s3_url
from lmcache_core.errors import ConfigError
from lmcache_core.metrics import Metrics
from lmcache_core.serdes.compressed import ZstdSerde
from lmcache_core.testing import (
    ChunkFactory,
    StorageBackendTests,
    backend_state_machine,
    chunk_payload,
    test_key,
)
from lmcache_core.testing.scratch import scratch_dir
from lmcache_core.testing.servers import S3Server

BUCKET = "lmcache-test"
_servers: dict[str, S3Server] = {}


def _s3() -> S3Server:
    if "s" not in _servers:
        s = S3Server().start()
        s.client().create_bucket(Bucket=BUCKET)
        _servers["s"] = s
    return _servers["s"]


def teardown_module(module):
    for s in _servers.values():
        s.stop()


def make_s3(capacity_bytes=0, slot_bytes=1 << 20, **kw) -> S3Backend:
    server = _s3()
    return S3Backend(
        f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}",
        client=server.client(),
        max_chunk_bytes=slot_bytes,
        **kw,
    )


def make_fs(capacity_bytes=0, slot_bytes=1 << 20, **kw) -> SharedFSBackend:
    return SharedFSBackend(scratch_dir(), max_chunk_bytes=slot_bytes, **kw)


SECRET = b"0123456789abcdef-test-secret"


class TestS3Backend(StorageBackendTests):
    def make_backend(self, capacity_bytes, slot_bytes):
        return make_s3(capacity_bytes, slot_bytes)

    def raw_get(self, backend, key):
        try:
            obj = backend.client.get_object(Bucket=backend.bucket, Key=backend.name_of(key))
        except Exception:
            return None
        return obj["Body"].read()

    def raw_set(self, backend, key, value):
        backend.client.put_object(Bucket=backend.bucket, Key=backend.name_of(key), Body=value)


class TestS3BackendAuthenticated(TestS3Backend):
    authenticated = True

    def make_backend(self, capacity_bytes, slot_bytes):
        return make_s3(capacity_bytes, slot_bytes, sealer=FrameSealer(SECRET))


class TestSharedFSBackend(StorageBackendTests):
    def make_backend(self, capacity_bytes, slot_bytes):
        return make_fs(capacity_bytes, slot_bytes)

    def raw_get(self, backend, key):
        path = backend.root / backend.name_of(key)
        return path.read_bytes() if path.exists() else None

    def raw_set(self, backend, key, value):
        path = backend.root / backend.name_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value)

    def raw_path(self, backend, key):
        return backend.root / backend.name_of(key)

    def raw_set_unusable(self, backend, key):
        """An (empty) folder in the chunk file's place: a miss for that chunk alone; it is
        removed, and the chunk is written again."""
        path = backend.root / backend.name_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.mkdir()


class TestSharedFSBackendAuthenticated(TestSharedFSBackend):
    authenticated = True

    def make_backend(self, capacity_bytes, slot_bytes):
        return make_fs(capacity_bytes, slot_bytes, sealer=FrameSealer(SECRET, encrypt=True))


TestS3Stateful = backend_state_machine(make_s3, max_examples=10).TestCase
TestSharedFSStateful = backend_state_machine(make_fs, max_examples=25).TestCase


def _put(b, f, ids, nbytes=4096):
    c = [f.make(test_key(i), nbytes) for i in ids]
    assert b.put(c) == [True] * len(c)
    for x in c:
        x.release()


def _read(b, f, i):
    (c,) = b.get([test_key(i)], f.allocate)
    if c is None:
        return None
    data = bytes(c.view)
    c.release()
    return data


def test_s3_corrupt_objects_are_deleted_misses():
    f = ChunkFactory(4096)
    m = Metrics()
    b = make_s3(metrics=m)
    _put(b, f, [1, 2])
    name = b.name_of(test_key(1))
    client = _s3().client()
    data = bytearray(client.get_object(Bucket=BUCKET, Key=name)["Body"].read())
    data[-1] ^= 0x40
    client.put_object(Bucket=BUCKET, Key=name, Body=bytes(data))
    assert _read(b, f, 1) is None
    assert _read(b, f, 2) == chunk_payload(test_key(2), 4096)
    assert m.get("lmcache:num_corrupt_chunks", tier="s3") == 1
    assert b.contains([test_key(1)]) == [False]


def test_s3_with_compression_and_a_reader_using_another_serde():
    f = ChunkFactory(4096)
    writer = make_s3(serde=ZstdSerde())
    _put(writer, f, [1])
    reader = S3Backend(
        f"s3://{BUCKET}/{writer.name_prefix}", client=_s3().client(), max_chunk_bytes=4096
    )
    assert reader.name_prefix == writer.name_prefix
    assert _read(reader, f, 1) == chunk_payload(test_key(1), 4096)


def test_s3_server_down_raises_for_the_tier_guard_to_catch():
    server = S3Server().start()
    server.client().create_bucket(Bucket=BUCKET)
    b = S3Backend(f"s3://{BUCKET}/x", client=server.client())
    server.stop()
    with pytest.raises(Exception):  # noqa: B017 - botocore's connection error
        b.contains([test_key(1)])


def test_fs_two_instances_share_files_and_corruption_is_a_miss(tmp_path):
    f = ChunkFactory(4096)
    m = Metrics()
    a = SharedFSBackend(tmp_path)
    b = SharedFSBackend(tmp_path, metrics=m)
    _put(a, f, [1, 2])
    assert b.contains([test_key(1), test_key(2), test_key(3)]) == [True, True, False]
    assert _read(b, f, 1) == chunk_payload(test_key(1), 4096)
    p = tmp_path / a.name_of(test_key(2))
    raw = bytearray(p.read_bytes())
    raw[100] ^= 1
    p.write_bytes(raw)
    assert _read(b, f, 2) is None
    assert not p.exists()
    assert m.get("lmcache:num_corrupt_chunks", tier="fs") == 1
    assert not list(tmp_path.glob("*/*/.*tmp*")), "no temporary file is left behind"


@pytest.mark.parametrize(
    "url, fix", [("s3://", "s3://bucket/prefix"), ("gs://b/p", "s3://bucket/prefix")]
)
def test_bad_s3_urls(url, fix):
    with pytest.raises(ConfigError, match=fix):
        parse_s3_url(url)


def test_s3_url_prefix():
    assert parse_s3_url("s3://b/a/b/") == ("b", "a/b/")
    assert parse_s3_url("s3://b") == ("b", "")


@pytest.mark.parametrize("url", ["fs://host/path", "fs://", "file:///x"])
def test_bad_fs_urls(url):
    with pytest.raises(ConfigError, match="fs:///"):
        fs_path(url)


def test_upstream_s3_url_forms():
    aws = parse_s3_location("s3://my.bucket.s3.us-west-2.amazonaws.com")
    assert (aws.bucket, aws.region, aws.prefix, aws.endpoint) == (
        "my.bucket",
        "us-west-2",
        "",
        None,
    )
    express = parse_s3_location("s3://b--usw2-az1--x-s3.s3express-usw2-az1.us-west-2.amazonaws.com")
    assert express.bucket == "b--usw2-az1--x-s3" and express.region == "us-west-2"
    hosted = parse_s3_location("s3://localhost:8080/bench/kv")
    assert (hosted.bucket, hosted.prefix, hosted.endpoint) == ("bench", "kv/", "localhost:8080")
    plain = parse_s3_location("s3://bucket/a/b")
    assert (plain.bucket, plain.prefix, plain.endpoint) == ("bucket", "a/b/", None)
    with pytest.raises(ConfigError, match="name the bucket"):
        parse_s3_location("s3://localhost:8080/")


def test_upstream_s3_settings_reach_a_real_store_through_the_engine(monkeypatch):
    """Upstream's S3 recipe: endpoint in the URL, region, static keys, plain HTTP, IO threads."""
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", SECRET.decode())
    from lmcache_core import CacheConfig, CacheEngine, KVLayout
    from lmcache_core.testing.paged_memory import PagedKVMemory

    server = _s3()
    layout = KVLayout(
        kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
    )
    extra = {
        "s3_region": "us-east-1",
        "aws_access_key_id": "test",
        "aws_secret_access_key": "test",
        "disable_tls": True,
        "s3_num_io_threads": 4,
        "s3_prefer_http2": False,  # upstream's CRT settings: no effect here
        "save_chunk_meta": False,
    }
    config = CacheConfig.from_dict(
        {
            "chunk_size": 16,
            "local_cpu": False,
            "remote_url": f"s3://127.0.0.1:{server.port}/{BUCKET}/up-{uuid.uuid4().hex[:6]}",
            "extra_config": extra,
        }
    )
    src, dst = PagedKVMemory(layout, seed=1), PagedKVMemory(layout, seed=2)
    tokens = list(range(32))
    with CacheEngine(config, model="m", layout=layout) as engine:
        s3 = engine.tiers[0].backend
        assert s3._pool._max_workers == 4
        assert engine.store(tokens, src.kv(src.table(32, 0))) == 32
        assert engine.flush(10)
        assert engine.retrieve(tokens, dst.kv(dst.table(32, 3))) == 32
    with pytest.raises(ConfigError, match="aws_secret_access_key"):
        with CacheEngine(
            config.replace(extra_config={"aws_access_key_id": "only-one"}), model="m", layout=layout
        ):
            pass


def test_a_frame_whose_serde_cannot_run_here_is_a_miss_left_in_place(tmp_path, monkeypatch):
    """A mixed fleet: one host writes zstd frames, another lacks zstandard. Its reads of
    those frames are misses that leave them for the hosts that can read them, never a
    failed batch (the others still hit) nor a deleted frame."""
    from lmcache_core.backends import frame_store
    from lmcache_core.serdes import compressed

    f = ChunkFactory(4096)
    writer = SharedFSBackend(tmp_path, serde=ZstdSerde())
    _put(writer, f, [1])
    plain = SharedFSBackend(tmp_path)
    _put(plain, f, [2])

    def missing(self, level=1):
        raise ImportError("zstandard is not installed: pip install 'lmcache-core[compression]'")

    monkeypatch.setattr(compressed.ZstdSerde, "__init__", missing)
    frame_store.serde_for_id.cache_clear()
    try:
        m = Metrics()
        reader = SharedFSBackend(tmp_path, metrics=m)
        got = reader.get([test_key(1), test_key(2)], f.allocate)
        assert got[0] is None, "a frame this host cannot decode is a miss"
        assert got[1] is not None and bytes(got[1].view) == chunk_payload(test_key(2), 4096)
        got[1].release()
        assert (tmp_path / writer.name_of(test_key(1))).exists(), "left for the others"
        assert m.get("lmcache:num_corrupt_chunks", tier=reader.name) == 0
    finally:
        monkeypatch.undo()
        frame_store.serde_for_id.cache_clear()
    assert _read(writer, f, 1) == chunk_payload(test_key(1), 4096)  # the writer still hits
