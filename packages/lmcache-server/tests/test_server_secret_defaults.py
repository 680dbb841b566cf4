"""Issue 32, items 1 and 4 at the cache server: a server over a shared tier refuses to
start without the deployment secret, and a rotation (a list of secrets) lets clients
and admin callers holding either secret in."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.cache_key import KeyNamespace
from lmcache_core.errors import ConfigError
from lmcache_core.mp.address import ServerAddress
from lmcache_core.mp.client import ServerChunkStore
from lmcache_core.testing.servers import free_port
from lmcache_server import CacheServer
from lmcache_server.testing import private_dir

LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
)
NEW = "rotated-in-secret-0123456789abcdef"
OLD = "rotated-out-secret-fedcba9876543210"


def test_a_server_over_a_shared_tier_refuses_to_start_without_a_secret(monkeypatch):
    monkeypatch.delenv("LMCACHE_AUTH_SECRET", raising=False)
    values = {"chunk_size": 16, "max_local_cpu_size": "1MiB", "remote_url": "redis://127.0.0.1:1"}
    sock = os.path.join(private_dir(), "s.sock")
    with pytest.raises(ConfigError) as e:
        CacheServer(CacheConfig.from_dict(values), socket_path=sock)
    text = str(e.value)
    assert "has no deployment secret" in text and "LMCACHE_AUTH_SECRET" in text, text
    assert "allow_unauthenticated_shared_tiers: true" in text, text
    assert not os.path.exists(sock), "refused before anything was opened"
    opted_out = {**values, "allow_unauthenticated_shared_tiers": True}
    CacheServer(CacheConfig.from_dict(opted_out), socket_path=sock).close(1.0)
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", NEW)
    CacheServer(CacheConfig.from_dict(values), socket_path=sock).close(1.0)


def test_during_a_rotation_clients_and_admin_callers_with_either_secret_get_in(monkeypatch):
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", f"{NEW},{OLD}")
    port, admin = free_port(), free_port()
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"})
    srv = CacheServer(
        config,
        socket_path=os.path.join(private_dir(), "s.sock"),
        tcp_host="127.0.0.1",
        tcp_port=port,
        shm_name=f"lmcache-rot-{os.getpid()}",
        admin_host="0.0.0.0",
        admin_port=admin,
    )
    address = ServerAddress(host="127.0.0.1", port=port)

    def engine(secret: bytes) -> CacheEngine:
        def factory(ns: KeyNamespace, metrics):
            return ServerChunkStore(address, ns, metrics=metrics, secret=secret, timeout=2)

        return CacheEngine(config, model="rot/model", layout=LAYOUT, store_factory=factory)

    def status(token: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{admin}/status")
        req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        engines = [engine(s.encode()) for s in (NEW, OLD, "neither-secret-0123456789abcdef")]
        assert [e.chunk_store.connected for e in engines] == [True, True, False]
        assert [status(t) for t in (NEW, OLD, "wrong")] == [200, 200, 401]
        for e in engines:
            e.close()
    finally:
        srv.close(1.0)
