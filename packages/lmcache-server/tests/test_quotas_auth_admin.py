"""Tenant quotas, the secret on TCP, and the admin endpoint (safe by default)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.cache_key import KeyNamespace
from lmcache_core.errors import ConfigError
from lmcache_core.mp.address import ServerAddress
from lmcache_core.mp.client import ServerChunkStore
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_core.testing.servers import free_port
from lmcache_server import CacheServer
from lmcache_server.testing import client_engine, private_dir

LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
)
CHUNK_BYTES = LAYOUT.chunk_bytes(16)
SECRET = "s3cret-" + "0123456789abcdef" * 3


def one_chunk_prompts(n: int, base: int) -> list[list[int]]:
    return [list(range(base + 100 * i, base + 100 * i + 16)) for i in range(n)]


def make_server(**cfg) -> CacheServer:
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB", **cfg})
    return CacheServer(config, socket_path=os.path.join(private_dir(), "s.sock"))


def test_a_tenant_over_its_quota_evicts_its_own_chunks_only():
    srv = make_server(tenant_quotas={"team-a": 3 * CHUNK_BYTES})
    url = f"unix://{srv.socket_path}"
    mem = PagedKVMemory(LAYOUT, seed=1)
    kv = mem.kv(mem.table(16, 0))
    try:
        with client_engine(url) as engine:
            b_prompts = one_chunk_prompts(2, 50_000)
            for p in b_prompts:
                assert engine.store(p, kv, cache_salt="team-b") == 16
            a_prompts = one_chunk_prompts(5, 0)
            for p in a_prompts:
                assert engine.store(p, kv, cache_salt="team-a") == 16
            held = [engine.lookup(p, cache_salt="team-a") == 16 for p in a_prompts]
            assert held == [False, False, True, True, True]  # its oldest went first
            assert all(engine.lookup(p, cache_salt="team-b") == 16 for p in b_prompts)
            (a,) = [t for t in srv.status()["tenants"] if t["tenant"] == "team-a"]
            assert a["used_bytes"] == 3 * CHUNK_BYTES
            # a store larger than the whole quota is skipped, not forced in
            big = list(range(90_000, 90_000 + 64))
            assert engine.store(big, mem.kv(mem.table(64, 1)), cache_salt="team-a") == 0
            assert srv.metrics.get("lmcache:server_quota_skips") == 1
    finally:
        srv.close(1.0)


def test_tcp_needs_the_secret_and_a_named_arena(monkeypatch):
    monkeypatch.delenv("LMCACHE_AUTH_SECRET", raising=False)
    with pytest.raises(ConfigError, match="deployment secret"):
        CacheServer(
            CacheConfig.from_dict({"max_local_cpu_size": "1MiB"}),
            socket_path=os.path.join(private_dir(), "s.sock"),
            tcp_host="127.0.0.1",
            tcp_port=free_port(),
            shm_name="lmcache-test-nosecret",
        )


def test_over_tcp_a_wrong_secret_is_refused_and_the_right_one_served(monkeypatch):
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", SECRET)
    port = free_port()
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"})
    srv = CacheServer(
        config,
        socket_path=os.path.join(private_dir(), "s.sock"),
        tcp_host="127.0.0.1",
        tcp_port=port,
        shm_name=f"lmcache-test-{os.getpid()}",
    )
    address = ServerAddress(host="127.0.0.1", port=port)  # a real TCP connection

    def engine(secret: bytes | None) -> CacheEngine:
        def factory(ns: KeyNamespace, metrics):
            return ServerChunkStore(address, ns, metrics=metrics, secret=secret, timeout=2)

        return CacheEngine(config, model="tcp/model", layout=LAYOUT, store_factory=factory)

    try:
        wrong = engine(b"another-secret-" + b"x" * 32)
        assert not wrong.chunk_store.connected
        assert srv.metrics.get("lmcache:server_auth_failures") == 1
        none = engine(None)
        assert not none.chunk_store.connected
        right = engine(SECRET.encode())
        assert right.chunk_store.connected
        src = PagedKVMemory(LAYOUT, seed=5)
        t = src.table(32, 0)
        assert right.store(list(range(32)), src.kv(t)) == 32
        dst = PagedKVMemory(LAYOUT, seed=6)
        t2 = dst.table(32, 1)
        assert right.retrieve(list(range(32)), dst.kv(t2)) == 32
        assert dst.tokens_kv(t2, 0, 32) == src.tokens_kv(t, 0, 32)
        for e in (wrong, none, right):
            e.close()
    finally:
        srv.close(1.0)
    assert not os.path.exists(f"/dev/shm/lmcache-test-{os.getpid()}")  # unlinked at close


def _http(method: str, url: str, body: dict | None = None, token: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_admin_endpoint_on_loopback_needs_no_secret_and_runs_nothing():
    port = free_port()
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"})
    srv = CacheServer(config, socket_path=os.path.join(private_dir(), "s.sock"), admin_port=port)
    base = f"http://127.0.0.1:{port}"
    try:
        with client_engine(f"unix://{srv.socket_path}") as engine:
            mem = PagedKVMemory(LAYOUT, seed=2)
            engine.store(list(range(32)), mem.kv(mem.table(32, 0)))
            assert _http("GET", f"{base}/healthcheck")[0] == 200
            code, body = _http("GET", f"{base}/status")
            assert code == 200 and json.loads(body)["chunks"] == 2
            code, body = _http("GET", f"{base}/metrics")
            assert code == 200 and b"lmcache:server_sessions" in body
            assert b"process_resident_memory_bytes" in body
            assert _http("PUT", f"{base}/quota/team-x", {"limit_gb": 0.5})[0] == 200
            code, body = _http("GET", f"{base}/quota/team-x")
            assert code == 200 and json.loads(body)["limit_gb"] == 0.5
            assert _http("PUT", f"{base}/quota/team-x", {"limit_gb": -1})[0] == 400
            assert _http("POST", f"{base}/run_script", {"script": "1"})[0] == 404
            code, body = _http("POST", f"{base}/clear-cache", {})
            assert code == 200 and json.loads(body)["chunks_removed"] == 2
            assert engine.lookup(list(range(32))) == 0
    finally:
        srv.close(1.0)


def test_an_admin_endpoint_off_loopback_requires_the_secret(monkeypatch):
    monkeypatch.delenv("LMCACHE_AUTH_SECRET", raising=False)
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"})
    with pytest.raises(ConfigError, match="admin endpoint"):
        CacheServer(config, socket_path=os.path.join(private_dir(), "s.sock"),
                    admin_host="0.0.0.0", admin_port=free_port())  # fmt: skip
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", SECRET)
    port = free_port()
    srv = CacheServer(config, socket_path=os.path.join(private_dir(), "s.sock"),
                      admin_host="0.0.0.0", admin_port=port)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        assert _http("GET", f"{base}/healthcheck")[0] == 200  # probes need no secret
        assert _http("GET", f"{base}/status")[0] == 401
        assert _http("GET", f"{base}/status", token="wrong")[0] == 401
        assert _http("POST", f"{base}/clear-cache", {})[0] == 401
        assert _http("GET", f"{base}/status", token=SECRET)[0] == 200
        assert srv.metrics.get("lmcache:server_auth_failures") == 3
    finally:
        srv.close(1.0)
