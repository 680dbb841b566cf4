"""The p2p tier's index on a real redis-server: entries, owners' records, one-round-trip lookups."""

from __future__ import annotations

import pytest

pytest.importorskip("redis")

from lmcache_core.backends.p2p import Entry, PeerIndex
from lmcache_core.testing import test_key
from lmcache_core.testing.servers import RedisServer


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
