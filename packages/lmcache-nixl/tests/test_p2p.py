"""The p2p tier with real NIXL agents in separate processes and a real redis-server index."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytest.importorskip("nixl")

from lmcache_core import CacheEngine
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_core.testing.servers import RedisServer
from lmcache_core.transport import Region, TransportError
from lmcache_nixl.testing import LAYOUT, SECRET, config, prompt
from lmcache_nixl.transport import NixlTransport

SRC = PagedKVMemory(LAYOUT, num_blocks=64, seed=7)  # what the peer stored


@pytest.fixture(autouse=True)
def _deployment_secret(monkeypatch):
    """Every instance on one p2p index has the deployment secret (the peers inherit it)."""
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", SECRET)


@pytest.fixture
def redis_server():
    with RedisServer() as s:
        yield s


def start_peer(url: str, n: int = 3, *flags: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmcache_nixl.testing", url, str(n), *flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return wait_for(proc, "READY")


def wait_for(proc: subprocess.Popen, word: str) -> subprocess.Popen:
    seen = []
    for line in proc.stdout:  # NIXL logs to stdout too
        seen.append(line)
        if line.strip() == word:
            return proc
    raise AssertionError(f"peer never printed {word}: {''.join(seen)[-2000:]}")


def retrieve(engine: CacheEngine, i: int) -> tuple[int, bytes, bytes]:
    toks = prompt(i)
    dst = PagedKVMemory(LAYOUT, num_blocks=64, seed=99)
    t = dst.table(len(toks), 3)
    got = engine.retrieve(toks, dst.kv(t))
    want = SRC.tokens_kv(SRC.table(len(toks), i), 0, got) if got else b""
    return got, dst.tokens_kv(t, 0, got) if got else b"", want


def test_chunks_stored_in_one_process_are_retrieved_in_another_byte_for_byte(redis_server):
    peer = start_peer(redis_server.url)
    try:
        with CacheEngine(config(redis_server.url), model="test/p2p", layout=LAYOUT) as b:
            assert [t.name for t in b.tiers] == ["cpu", "p2p"]
            assert b.lookup(prompt(0)) == 256
            got, have, want = retrieve(b, 0)
            assert got == 256 and have == want
            assert b.metrics.get("lmcache:num_promotions", tier="p2p") == 4
            # Now it is in B's DRAM: a second retrieve needs no peer.
            assert b.cpu.contains(b.keys(b.spans(prompt(0)))) == [True] * 4
            assert b.lookup(prompt(9)) == 0  # never stored anywhere
    finally:
        peer.kill()
        peer.wait()


def test_a_slot_reused_by_its_owner_after_the_lookup_is_a_miss_not_wrong_kv(redis_server):
    """The race an eviction makes: the entry still says where the chunk was, the bytes moved.

    The reader copies the slot, then reads its generation word: moved, so the
    copy is dropped. Without that check it would return another prompt's KV.
    """
    peer = start_peer(redis_server.url)
    try:
        with CacheEngine(config(redis_server.url), model="test/p2p", layout=LAYOUT) as b:
            peer.stdin.write("reuse\n")
            peer.stdin.flush()
            wait_for(peer, "REUSED")
            assert b.lookup(prompt(0)) == 256, "the old entries are back in the index"
            got, _, _ = retrieve(b, 0)
            assert got == 0, "bytes of a reused slot must never be returned"
            assert b.metrics.get("lmcache:num_stale_chunks", tier="p2p") >= 1
            assert b.lookup(prompt(0)) == 0, "stale entries are unpublished"
            # The prompts now in those slots are pulled intact.
            toks = prompt(100)
            dst = PagedKVMemory(LAYOUT, num_blocks=64, seed=99)
            t = dst.table(len(toks), 3)
            assert b.retrieve(toks, dst.kv(t)) == 256
            assert dst.tokens_kv(t, 0, 256) == SRC.tokens_kv(SRC.table(256, 1), 0, 256)
    finally:
        peer.kill()
        peer.wait()


def test_with_checksums_on_every_pulled_chunk_is_hashed_and_matches(redis_server):
    peer = start_peer(redis_server.url, 3, "checksums")
    try:
        cfg = config(redis_server.url, p2p_verify_checksums=True)
        with CacheEngine(cfg, model="test/p2p", layout=LAYOUT) as b:
            p2p = b.tiers[1].backend
            entries = p2p.index.lookup(b.keys(b.spans(prompt(2))))
            assert all(e is not None and len(e.checksum) == 16 for e in entries)
            got, have, want = retrieve(b, 2)
            assert got == 256 and have == want
            assert b.metrics.get("lmcache:num_corrupt_chunks", tier="p2p") == 0
            peer.stdin.write("corrupt\n")  # damage the owner's copy in place
            peer.stdin.flush()
            wait_for(peer, "CORRUPTED")
            assert retrieve(b, 0)[0] == 0, "a damaged first chunk: nothing of the prompt"
            assert b.metrics.get("lmcache:num_corrupt_chunks", tier="p2p") == 1
    finally:
        peer.kill()
        peer.wait()


def test_a_peer_killed_costs_misses_and_its_entries_disappear(redis_server):
    peer = start_peer(redis_server.url)
    with CacheEngine(config(redis_server.url), model="test/p2p", layout=LAYOUT) as b:
        assert b.lookup(prompt(1)) == 256
        peer.kill()  # kill -9, mid-run
        peer.wait()
        t0 = time.monotonic()
        got, _, _ = retrieve(b, 1)  # its record is still in the index: a read is tried
        assert got == 0, "a dead peer's memory cannot be read: a miss"
        assert b.metrics.get("lmcache:num_failures", tier="p2p") >= 1
        assert time.monotonic() - t0 < 10
        time.sleep(1.2)  # past the peer TTL: its record expired
        assert b.lookup(prompt(2)) == 0
        p2p = b.tiers[1].backend
        assert p2p.index.lookup(b.keys(b.spans(prompt(2)))) == [None] * 4, "dead entries dropped"


def test_evicted_chunks_are_unpublished_and_a_clean_exit_retires_the_peer(redis_server):
    peer = start_peer(redis_server.url, n=2)
    with CacheEngine(config(redis_server.url), model="test/p2p", layout=LAYOUT) as b:
        assert b.lookup(prompt(0)) == 256
        peer.stdin.write("evict\n")
        peer.stdin.flush()
        wait_for(peer, "EVICTED")
        time.sleep(0.6)  # the heartbeat flushes unpublishing
        assert b.lookup(prompt(0)) == 0
        peer.stdin.write("exit\n")
        peer.stdin.flush()
        peer.wait(10)
        p2p = b.tiers[1].backend
        # The peer retired its record at exit: only this engine's own record is left.
        records = {
            k.decode() for k in p2p.index.client.scan_iter(match=f"{p2p.index.prefix}peer:*")
        }
        assert records == {p2p.index._peer(p2p.transport.peer_id)}


def test_transport_errors_are_clear():
    t = NixlTransport()
    with pytest.raises(TransportError, match="unknown peer"):
        t.read("nobody", [(Region(0, 8), Region(0, 8))], timeout=1)
    with pytest.raises(TransportError, match="metadata"):
        t.connect(b"not nixl metadata")
    t.close()


def test_bad_p2p_config_says_what_to_fix():
    from lmcache_core.config import CacheConfig
    from lmcache_core.errors import ConfigError

    with pytest.raises(ConfigError, match="p2p_index_url"):
        CacheConfig.from_dict({"enable_p2p": True})


def _resident_pages(address: int, size: int) -> tuple[int, int]:
    """(resident, total) pages of a mapping, from mincore(2)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    rc = libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec)
    assert rc == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec), pages


def test_the_arena_peers_read_into_is_resident_before_any_read(redis_server):
    """Reads into never-touched pages crawled (0.08 GB/s on a shared core, 1.9 s per prompt in
    vLLM): the p2p tier faults its arena in when it registers it."""
    with CacheEngine(config(redis_server.url), model="test/p2p", layout=LAYOUT) as b:
        arena = b.pool.arena
        resident, total = _resident_pages(arena.address, arena.size)
        assert resident == total
