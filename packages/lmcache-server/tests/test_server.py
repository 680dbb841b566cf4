"""The cache server with real clients: bytes, sharing, namespaces, leases, crashes.

Engines are :class:`~lmcache_core.CacheEngine` fronts whose store is the
server (``ServerChunkStore``), with numpy paged memory standing in for an
engine's KV. Crash tests run the server or the client in a process of its own
and kill it with SIGKILL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from lmcache_core import CacheConfig, KVLayout
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_server import CacheServer
from lmcache_server.testing import ServerProcess, client_engine, private_dir

LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
)


def kv_pair(n: int, seed: int = 1):
    src, dst = PagedKVMemory(LAYOUT, seed=seed), PagedKVMemory(LAYOUT, seed=seed + 100)
    return src, src.table(n, 0), dst, dst.table(n, 1)


def wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_a_second_engine_loads_exactly_the_bytes_the_first_stored(url):
    tokens = list(range(70))
    src, ts, dst, td = kv_pair(70)
    with client_engine(url) as a, client_engine(url) as b:
        assert a.store(tokens, src.kv(ts)) == 70
        assert b.lookup(tokens, pin_owner="req") == 70
        assert b.retrieve(tokens, dst.kv(td), pin_owner="req") == 70
        assert dst.tokens_kv(td, 0, 70) == src.tokens_kv(ts, 0, 70)
        # a longer prompt with the same first 64 tokens hits those, not more
        assert b.lookup([*tokens[:64], 999, 998]) == 64


def test_engines_of_other_models_and_salts_never_see_each_others_chunks(url, server):
    tokens = list(range(48))
    src, ts, _, _ = kv_pair(48)
    with client_engine(url) as a, client_engine(url, model="other/model") as b:
        assert a.store(tokens, src.kv(ts), cache_salt="tenant-a") == 48
        assert a.lookup(tokens, cache_salt="tenant-a") == 48
        assert a.lookup(tokens, cache_salt="tenant-b") == 0  # another tenant
        assert a.lookup(tokens) == 0  # no salt
        assert b.lookup(tokens, cache_salt="tenant-a") == 0  # another model
    assert len(server.status()["namespaces"]) == 2


def test_a_chunk_is_stored_once_and_its_slot_is_freed_after_loads(url, server):
    tokens = list(range(32))
    src, ts, dst, td = kv_pair(32)
    with client_engine(url) as a:
        assert a.store(tokens, src.kv(ts)) == 32
        assert a.store(tokens, src.kv(ts)) == 0  # already there
        for _ in range(5):
            assert a.retrieve(tokens, dst.kv(td)) == 32
        # releases travel a moment after the load: no lease is left behind
        assert wait_for(lambda: all(s["leases"] == 0 for s in server.status()["sessions"]))
    assert server.status()["chunks"] == 2


def test_uncommitted_slots_and_pins_die_with_the_connection(url, server):
    tokens = list(range(64))
    src, ts, _, _ = kv_pair(64)
    with client_engine(url) as a:
        a.store(tokens, src.kv(ts))
    pool = server.registry.pool
    free_before = pool.free_slots
    b = client_engine(url)
    b.lookup(tokens, pin_owner="r1")  # pins 4 chunks
    staged = b.store_async(list(range(100, 164)), src.kv(ts))  # 4 slots, never committed
    assert staged is not None and len(staged.todo) == 4
    assert pool.free_slots == free_before - 4
    assert server.registry.cpu.pinned_keys()
    b.chunk_store._session.sock.close()  # the engine vanishes
    assert wait_for(lambda: pool.free_slots == free_before)
    assert wait_for(lambda: not server.registry.cpu.pinned_keys())
    assert server.status()["sessions"] == []


def test_lookups_pin_per_engine_not_across_engines(url, server):
    tokens = list(range(32))
    src, ts, _, _ = kv_pair(32)
    with client_engine(url) as a, client_engine(url) as b:
        a.store(tokens, src.kv(ts))
        a.lookup(tokens, pin_owner="same-id")
        b.lookup(tokens, pin_owner="same-id")
        b.unpin("same-id")  # b's unpin must not release a's pins
        assert len(server.registry.cpu.pinned_keys()) == 2
        a.unpin("same-id")
        assert wait_for(lambda: not server.registry.cpu.pinned_keys())


def test_no_server_is_a_miss_and_the_engine_connects_when_it_comes(tmp_path):
    d = private_dir()
    sock = os.path.join(d, "lmcache.sock")
    url = f"unix://{sock}"
    tokens = list(range(32))
    src, ts, dst, td = kv_pair(32)
    engine = client_engine(url)
    assert engine.lookup(tokens) == 0
    assert engine.store(tokens, src.kv(ts)) == 0
    assert engine.retrieve(tokens, dst.kv(td)) == 0
    assert engine.metrics.get("lmcache:num_failures") >= 3
    srv = CacheServer(CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"}),
                      socket_path=sock)  # fmt: skip
    try:
        engine.chunk_store._next_try = 0  # do not wait out the backoff in a test
        assert engine.store(tokens, src.kv(ts)) == 32
        assert engine.retrieve(tokens, dst.kv(td)) == 32
        assert dst.tokens_kv(td, 0, 32) == src.tokens_kv(ts, 0, 32)
    finally:
        engine.close()
        srv.close(1.0)


def test_a_killed_server_is_a_miss_then_a_restarted_one_serves_and_finds_its_disk(tmp_path):
    disk = tmp_path / "disk"
    cfg = {"chunk_size": 16, "max_local_cpu_size": "1MiB", "local_disk": f"file://{disk}",
           "max_local_disk_size": "8MiB"}  # fmt: skip
    tokens = list(range(80))
    src, ts, dst, td = kv_pair(80)
    server = ServerProcess(cfg).start()
    engine = client_engine(server.url)
    try:
        assert engine.store(tokens, src.kv(ts)) == 80
        assert engine.flush(10)  # on disk too
        server.kill()
        t0 = time.monotonic()
        assert engine.lookup(tokens) == 0  # a miss, not an error
        assert engine.retrieve(tokens, dst.kv(td)) == 0
        assert time.monotonic() - t0 < 5
        server.start()
        engine.chunk_store._next_try = 0
        assert wait_for(lambda: engine.lookup(tokens) == 80, 15)  # from the restarted disk tier
        assert engine.retrieve(tokens, dst.kv(td)) == 80
        assert dst.tokens_kv(td, 0, 80) == src.tokens_kv(ts, 0, 80)
    finally:
        engine.close()
        server.stop()


_CLIENT = textwrap.dedent(
    """
    import sys, time
    from lmcache_core import KVLayout
    from lmcache_core.testing.paged_memory import PagedKVMemory
    from lmcache_server.testing import client_engine
    layout = KVLayout(kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2,
                      head_size=8, block_size=4)
    e = client_engine(sys.argv[1])
    mem = PagedKVMemory(layout, seed=3)
    t = mem.table(64, 0)
    e.lookup(list(range(64)), pin_owner="r")          # pins what is there
    chunks, _ = e.chunk_store.fetch(e.keys(e.spans(list(range(64)))), e.spans(list(range(64))),
                                    alias_last=False)   # a load in flight: leased
    staged = e.store_async(list(range(500, 564)), mem.kv(t))  # a store in flight
    print("HOLDING", len(chunks), len(staged.todo), flush=True)
    time.sleep(600)
    """
)


def test_an_engine_killed_mid_load_and_mid_store_leaks_nothing(tmp_path):
    cfg = {"chunk_size": 16, "max_local_cpu_size": "1MiB"}
    tokens = list(range(64))
    src, ts, dst, td = kv_pair(64)
    with ServerProcess(cfg) as server:
        engine = client_engine(server.url)
        engine.store(tokens, src.kv(ts))

        def status():
            return json.loads(json.dumps(engine.chunk_store.status()))

        before = status()
        child = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, server.url], stdout=subprocess.PIPE, text=True
        )
        line = child.stdout.readline()
        assert line.startswith("HOLDING 4 4"), line
        during = status()
        assert during["slots_used"] == before["slots_used"] + 4  # the store's slots
        assert sum(s["leases"] for s in during["sessions"]) == 8
        child.kill()
        child.wait(10)
        assert wait_for(lambda: status()["slots_used"] == before["slots_used"])
        after = status()
        assert sum(s["leases"] for s in after["sessions"]) == 0
        assert len(after["sessions"]) == 1
        # the restarted engine hits everything that was committed
        with client_engine(server.url) as again:
            assert again.lookup(tokens) == 64
            assert again.retrieve(tokens, dst.kv(td)) == 64
            assert dst.tokens_kv(td, 0, 64) == src.tokens_kv(ts, 0, 64)
        engine.close()


def test_a_model_whose_chunks_do_not_fit_the_slots_is_refused_with_the_fix(url, server):
    big = KVLayout(
        kind="vllm_flash", dtype="float32", num_layers=8, num_kv_heads=4, head_size=16, block_size=4
    )
    with client_engine(url) as small:  # the first engine sets the slot size
        small.lookup([1, 2, 3])
    engine = client_engine(url, layout=big)
    assert engine.lookup(list(range(32))) == 0
    assert not engine.chunk_store.connected
    engine.close()


def test_the_status_and_clear_of_the_server(url, server):
    tokens = list(range(48))
    src, ts, _, _ = kv_pair(48)
    with client_engine(url) as a:
        a.store(tokens, src.kv(ts))
        st = a.chunk_store.status()
        assert st["chunks"] == 3 and st["namespaces"][0]["model"] == "test/model"
        assert server.clear() == 3
        assert a.lookup(tokens) == 0


@pytest.mark.parametrize("timeout", [0.5])
def test_a_hung_server_costs_at_most_the_timeout(timeout):
    """A server that accepts and then never answers (stopped, swapping): a miss in time."""
    import socket

    d = private_dir()
    path = os.path.join(d, "hung.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(8)
    try:
        from lmcache_server.testing import client_engine as ce

        t0 = time.monotonic()
        engine = ce(f"unix://{path}", timeout=timeout)
        assert engine.lookup(list(range(32))) == 0
        assert time.monotonic() - t0 < 4 * timeout + 1
        engine.close()
    finally:
        lsock.close()
