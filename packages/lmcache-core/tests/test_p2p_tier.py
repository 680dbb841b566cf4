"""The p2p tier's index and validation logic, on a real redis-server.

Transfers between real processes over NIXL are tested in packages/lmcache-nixl.
"""

from __future__ import annotations

import ctypes

import pytest

pytest.importorskip("redis")

from lmcache_core.backends.p2p import Entry, P2PBackend, PeerIndex
from lmcache_core.pool import SlotPool
from lmcache_core.testing import test_key
from lmcache_core.testing.servers import RedisServer
from lmcache_core.transport import Transport, TransportError


@pytest.fixture(scope="module")
def server():
    with RedisServer() as s:
        yield s


@pytest.fixture
def index(server):
    idx = PeerIndex(server.url, prefix=f"t{id(object())}:", peer_ttl_s=30)
    yield idx
    idx.client.flushdb()


def entry(peer: str, n: int) -> Entry:
    return Entry(peer, 4096 * n, 1000 + n, 16, 8 * n, n)


def test_entries_round_trip_and_foreign_bytes_are_not_entries():
    e = Entry("a", 1, 2, 3, 4, 5, "ff")
    d = Entry.decode(e.encode())
    assert d is not None and (d.peer, d.address, d.nbytes, d.num_tokens) == ("a", 1, 2, 3)
    assert (d.generation_address, d.generation, d.checksum) == (4, 5, "ff")
    assert Entry.decode(b"a|1|2|3|ff") is None  # an older format: a miss, not a crash
    assert Entry.decode(b"\xff\xfe") is None


@pytest.mark.parametrize("scripted", [True, False])
def test_one_lookup_gives_entries_and_only_the_records_of_other_live_owners(index, scripted):
    if not scripted:
        index._script = False  # as on a server that refuses scripts
    keys = [test_key(i) for i in range(6)]
    index.publish(
        [(keys[0], entry("alive", 0)), (keys[1], entry("dead", 1)), (keys[2], entry("me", 2))]
        + [(keys[4], entry("alive", 4))]
    )
    index.announce("alive", b"metadata of alive")
    index.announce("me", b"mine")
    entries, peers = index.lookup_with_peers(keys, exclude="me")
    assert [e.peer if e else None for e in entries] == ["alive", "dead", "me", None, "alive", None]
    assert entries[4].address == 4096 * 4 and entries[4].generation == 4
    assert peers == {"alive": b"metadata of alive", "dead": None}
    assert index.lookup_with_peers([], exclude="me") == ([], {})


def test_unpublish_removes_only_the_owners_own_entries(index):
    k = test_key(1)
    index.publish([(k, entry("new-owner", 1))])
    assert index.unpublish([k], "old-owner") == 0
    assert index.lookup([k])[0].peer == "new-owner"
    assert index.unpublish([k], "new-owner") == 1
    assert index.lookup([k]) == [None]


# --------------------------------------------------------------------------- the tier's logic
# An in-process transport (memmove between two pools of this process): a test
# double beside the real NIXL tests in packages/lmcache-nixl, so races and
# timeouts can be staged exactly.


class LoopbackTransport(Transport):
    name = "loopback"

    def __init__(self, peer: str) -> None:
        self._peer = peer
        self.fail_word_reads = False

    @property
    def peer_id(self) -> str:
        return self._peer

    def register(self, arena) -> None:
        pass

    def metadata(self) -> bytes:
        return self._peer.encode()

    def connect(self, metadata: bytes) -> str:
        return metadata.decode()

    def read(self, peer, pairs, *, timeout):
        if self.fail_word_reads and all(r.nbytes == 8 for _, r in pairs):
            raise TransportError("word read timed out", in_flight=True)
        for local, remote in pairs:
            ctypes.memmove(local.address, remote.address, remote.nbytes)


@pytest.fixture
def tiers(server):
    prefix = f"tier{id(object())}:"
    made = []

    def make(name):
        pool = SlotPool.anonymous(4 * 4096, 4096)
        backend = P2PBackend(
            LoopbackTransport(name), PeerIndex(server.url, prefix=prefix), pool, timeout_s=1
        )
        made.append((backend, pool))
        return backend, pool

    yield make
    for backend, pool in made:
        backend.close()
        pool.close()


def _stored(pool: SlotPool, key, fill: int):
    c = pool.allocate(key, 16, 4096)
    c.view[:] = bytes([fill]) * 4096
    return c


def test_a_reused_slot_is_stale_and_a_word_read_timeout_frees_the_pulled_slots(tiers):
    owner, owner_pool = tiers("owner")
    reader, reader_pool = tiers("reader")
    a = _stored(owner_pool, test_key(1), 0xA1)
    assert owner.put([a]) == [True]
    got = reader.get([test_key(1)], reader_pool.allocate)
    assert got[0] is not None and bytes(got[0].view) == bytes([0xA1]) * 4096
    got[0].release()

    # The owner evicts and reuses the slot; its entry has not been unpublished yet.
    slot = a.slot
    a.release()
    b = _stored(owner_pool, test_key(2), 0xB2)
    assert b.slot == slot
    assert reader.get([test_key(1)], reader_pool.allocate) == [None]
    assert reader.metrics.get("lmcache:num_stale_chunks", tier="p2p") == 1
    assert reader.index.lookup([test_key(1)]) == [None], "the stale entry is unpublished"
    assert reader_pool.free_slots == reader_pool.num_slots, "the stale copy's slot came back"

    # The word read times out: a miss; the chunks' slots are free again (their
    # reads finished), only the word buffer is set aside.
    owner.put([b])
    reader.transport.fail_word_reads = True
    words_before = reader._words
    assert reader.get([test_key(2)], reader_pool.allocate) == [None]
    assert reader_pool.free_slots == reader_pool.num_slots
    assert reader._quarantine == [words_before] and reader._words is not words_before
    reader.transport.fail_word_reads = False
    got = reader.get([test_key(2)], reader_pool.allocate)
    assert got[0] is not None and bytes(got[0].view) == bytes([0xB2]) * 4096
    got[0].release()
    b.release()
