"""Eviction policies: the shipped conformance suite plus policy-specific behaviour."""

from __future__ import annotations

from lmcache_core.eviction.fifo import FIFOPolicy
from lmcache_core.eviction.lfu import LFUPolicy
from lmcache_core.eviction.lru import LRUPolicy
from lmcache_core.eviction.s3fifo import S3FIFOPolicy
from lmcache_core.testing import EvictionPolicyTests, eviction_state_machine


class TestLRU(EvictionPolicyTests):
    def make_policy(self):
        return LRUPolicy()


class TestS3FIFO(EvictionPolicyTests):
    def make_policy(self):
        return S3FIFOPolicy()


class TestFIFO(EvictionPolicyTests):
    def make_policy(self):
        return FIFOPolicy()


class TestLFU(EvictionPolicyTests):
    def make_policy(self):
        return LFUPolicy()


TestLRUStateful = eviction_state_machine(LRUPolicy).TestCase
TestS3FIFOStateful = eviction_state_machine(S3FIFOPolicy).TestCase
TestFIFOStateful = eviction_state_machine(FIFOPolicy).TestCase
TestLFUStateful = eviction_state_machine(LFUPolicy).TestCase


def test_fifo_ignores_reads_and_lfu_keeps_the_most_read():
    fifo, lfu = FIFOPolicy(), LFUPolicy()
    for p in (fifo, lfu):
        for k in "abcd":
            p.on_insert(k)
        for k in "aaabbc":
            p.on_access(k)
    assert [fifo.evict(lambda k: True) for _ in range(4)] == ["a", "b", "c", "d"]
    # counts: a=4, b=3, c=2, d=1; a pinned key is skipped, not lost
    assert lfu.evict(lambda k: k != "d") == "c"
    assert [lfu.evict(lambda k: True) for _ in range(3)] == ["d", "b", "a"]


def test_upstream_policy_names_select_the_policies():
    from lmcache_core.config import CacheConfig
    from lmcache_core.plugins import EVICTION_POLICIES, load_plugin

    for name, cls in (("LRU", LRUPolicy), ("FIFO", FIFOPolicy), ("LFU", LFUPolicy)):
        config = CacheConfig.from_dict({"cache_policy": name})
        assert load_plugin(EVICTION_POLICIES, config.cache_policy) is cls


def test_lru_evicts_least_recently_used_first():
    p = LRUPolicy()
    for k in "abcd":
        p.on_insert(k)
    p.on_access("a")
    order = [p.evict(lambda k: True) for _ in range(4)]
    assert order == ["b", "c", "d", "a"]


def _hits(policy, capacity, trace):
    """Simulate a cache of ``capacity`` keys driven by ``trace``; return the hit count."""
    cached: set = set()
    hits = 0
    for k in trace:
        if k in cached:
            hits += 1
            policy.on_access(k)
            continue
        if len(cached) >= capacity:
            cached.discard(policy.evict(lambda _k: True))
        policy.on_insert(k)
        cached.add(k)
    return hits


def test_s3fifo_keeps_a_hot_set_through_a_scan():
    """Shared system prompts (hot) survive a stream of one-off documents (scan)."""
    hot = [f"hot{i}" for i in range(8)]
    trace = []
    for r in range(200):
        trace += hot
        trace += [f"scan{r}-{j}" for j in range(12)]
    lru, s3 = _hits(LRUPolicy(), 16, trace), _hits(S3FIFOPolicy(), 16, trace)
    assert s3 > lru
    assert s3 >= 0.9 * 8 * 199  # the hot set is hit nearly every round


def test_s3fifo_ghost_sends_a_quick_return_to_main():
    p = S3FIFOPolicy()
    for i in range(20):
        p.on_insert(i)
    victim = p.evict(lambda k: True)
    p.on_insert(victim)
    assert victim in p._main
