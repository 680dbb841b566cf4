"""The p2p tier's index and validation logic, on a real redis-server.

Transfers between real processes over NIXL are tested in packages/lmcache-nixl.
"""

from __future__ import annotations

import ctypes

import pytest

pytest.importorskip("redis")

from lmcache_core.auth import IndexSigner
from lmcache_core.backends.p2p import Entry, P2PBackend, PeerIndex
from lmcache_core.layout import KVLayout
from lmcache_core.pool import SlotPool
from lmcache_core.testing import test_key
from lmcache_core.testing.servers import RedisServer
from lmcache_core.transport import Transport, TransportError

SECRET = b"p2p-test-secret-0123456789abcdef"
#: 256 bytes a token: a chunk of 16 tokens is one 4096-byte slot.
LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=1, num_kv_heads=2, head_size=32, block_size=16
)


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
    k = test_key(0)
    d = Entry.decode(e.encode(k), k)
    assert d is not None and (d.peer, d.address, d.nbytes, d.num_tokens) == ("a", 1, 2, 3)
    assert (d.generation_address, d.generation, d.checksum) == (4, 5, "ff")
    assert Entry.decode(b"a|1|2|3|ff", k) is None  # an older format: a miss, not a crash
    assert Entry.decode(b"\xff\xfe", k) is None
    for bad in (b"a|-1|2|3|4|5|", b"|1|2|3|4|5|", b"a|1|0|3|4|5|", b"a|1|2|3|4|%d|" % (1 << 64)):
        assert Entry.decode(bad, k) is None, bad
    assert Entry.decode(b"\xff\xfe|1|2|3|4|5|", k) is None  # a non-UTF-8 owner
    signer = IndexSigner(SECRET)
    signed = e.encode(k, signer)
    assert Entry.decode(signed, k, signer) is not None
    assert Entry.decode(signed, test_key(1), signer) is None  # copied under another key
    assert Entry.decode(e.encode(k), k, signer) is None  # unsigned
    assert Entry.decode(signed.replace(b"a|1|", b"a|9|"), k, signer) is None


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

    def make(name, secret=None, transport=None):
        pool = SlotPool.anonymous(4 * 4096, 4096)
        signer = IndexSigner(secret) if secret else None
        backend = P2PBackend(
            transport or LoopbackTransport(name),
            PeerIndex(server.url, prefix=prefix, signer=signer),
            pool,
            timeout_s=1,
            layout=LAYOUT,
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


# --------------------------------------------------------------------------- hostile index values


def _raw_entry(index: PeerIndex, key) -> bytes:
    return index.client.get(index._chunk(key))


def _set_raw(index: PeerIndex, key, value: bytes) -> None:
    index.client.set(index._chunk(key), value)


def _pull(reader, pool, key):
    (c,) = reader.get([key], pool.allocate)
    if c is None:
        return None
    data = bytes(c.view)
    c.release()
    return data


def test_copied_entries_serve_another_tenants_kv_only_without_the_secret(tiers):
    """Tenant B's key pointing at tenant A's chunk: a hit without the secret, a miss with it."""
    for secret in (None, SECRET):
        owner, opool = tiers(f"owner-{bool(secret)}", secret)
        reader, rpool = tiers(f"reader-{bool(secret)}", secret)
        a = _stored(opool, test_key(10), 0xAA)
        owner.put([a])
        _set_raw(owner.index, test_key(11), _raw_entry(owner.index, test_key(10)))
        got = _pull(reader, rpool, test_key(11))
        if secret is None:
            assert got == bytes([0xAA]) * 4096  # what an unauthenticated index allows
        else:
            assert got is None
            assert reader.metrics.get("lmcache:num_forged_chunks", tier="p2p") == 1
            assert _pull(reader, rpool, test_key(10)) == bytes([0xAA]) * 4096
        assert rpool.free_slots == rpool.num_slots
        a.release()


def test_entry_pointed_at_other_memory_is_refused_with_the_secret(tiers):
    owner, opool = tiers("owner", SECRET)
    reader, rpool = tiers("reader", SECRET)
    a, b = _stored(opool, test_key(1), 0x11), _stored(opool, test_key(2), 0x22)
    owner.put([a, b])
    raw = _raw_entry(owner.index, test_key(1)).split(b"|")
    raw[1] = str(b.address).encode()  # same checksum field, other chunk's address
    _set_raw(owner.index, test_key(1), b"|".join(raw))
    assert _pull(reader, rpool, test_key(1)) is None
    assert reader.metrics.get("lmcache:num_forged_chunks", tier="p2p") == 1
    a.release()
    b.release()


class RaisingTransport(LoopbackTransport):
    """What NIXL does with an address outside the peer's registration: a RuntimeError."""

    def read(self, peer, pairs, *, timeout):
        if any(r.address >= 1 << 62 for _, r in pairs):
            raise RuntimeError("NIXL_ERR_INVALID_PARAM")
        super().read(peer, pairs, timeout=timeout)


@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "authenticated"])
def test_malformed_entries_are_misses_never_errors_or_leaks(tiers, secret):
    owner, opool = tiers("owner", secret)
    reader, rpool = tiers("reader", secret, RaisingTransport("reader"))
    good = _stored(opool, test_key(1), 0x33)
    owner.put([good])
    ok_raw = _raw_entry(owner.index, test_key(1))
    fields = ok_raw.split(b"|")
    cases = {
        2: b"owner|-4096|4096|16|0|0|",  # a negative address
        3: b"\xff\xfeowner|4096|4096|16|0|0|",  # a non-UTF-8 owner
        4: b"|".join([fields[0], fields[1], b"2048", b"16", *fields[4:]]),  # short for its tokens
        5: b"|".join([fields[0], str(1 << 62).encode(), *fields[2:]]),  # far outside the arena
    }
    for k, v in cases.items():
        _set_raw(owner.index, test_key(k), v)
    keys = [test_key(i) for i in (2, 3, 1, 4)]
    for _ in range(3):  # repeated: nothing leaks, the tier stays usable
        got = reader.get(keys, rpool.allocate)
        assert [c is not None for c in got] == [False, False, True, False]
        assert bytes(got[2].view) == bytes([0x33]) * 4096
        got[2].release()
        assert rpool.free_slots == rpool.num_slots
    assert reader.contains(keys) == [False, False, True, False]
    # An address the transport refuses fails its whole batch (without the secret
    # the reader cannot tell it from a good one before reading): misses, no leak.
    got = reader.get([test_key(5), test_key(1)], rpool.allocate)
    hit = got[1] is not None
    assert got[0] is None and hit == (secret is not None)
    if hit:
        got[1].release()
    assert rpool.free_slots == rpool.num_slots
    assert _pull(reader, rpool, test_key(1)) == bytes([0x33]) * 4096
    good.release()


def test_forged_peer_record_is_never_read_from(tiers):
    """A record of "owner" carrying "evil"'s metadata: with the secret its tag fails; without
    it, the transport names another peer than the entry, and nothing is read."""
    for secret in (None, SECRET):
        owner, opool = tiers(f"o-{bool(secret)}", secret)
        reader, rpool = tiers(f"r-{bool(secret)}", secret)
        c = _stored(opool, test_key(1), 0x44)
        owner.put([c])
        owner._stop.set()  # no heartbeat restores the record meanwhile
        owner._heartbeat.join(5)
        reader.index.client.set(reader.index._peer(f"o-{bool(secret)}"), b"evil")
        assert _pull(reader, rpool, test_key(1)) is None
        assert reader.metrics.get("lmcache:num_forged_chunks", tier="p2p") >= 1
        assert rpool.free_slots == rpool.num_slots
        c.release()
