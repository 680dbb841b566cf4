"""``EvictionPolicyTests``: the eviction policy contract, as a pytest class to subclass."""

from __future__ import annotations

import pytest

from lmcache_core.eviction.base import EvictionPolicy


class EvictionPolicyTests:
    """Subclass and implement :meth:`make_policy`."""

    def make_policy(self) -> EvictionPolicy:
        raise NotImplementedError("implement make_policy()")

    @pytest.fixture
    def policy(self) -> EvictionPolicy:
        return self.make_policy()

    @pytest.mark.conformance
    def test_has_a_name(self, policy):
        assert isinstance(policy.name, str) and policy.name == policy.name.lower()

    @pytest.mark.conformance
    def test_empty_policy_evicts_nothing(self, policy):
        assert policy.evict(lambda k: True) is None
        assert len(policy) == 0

    @pytest.mark.conformance
    def test_every_key_is_evicted_exactly_once(self, policy):
        keys = list(range(50))
        for k in keys:
            policy.on_insert(k)
        for k in keys[::3]:
            policy.on_access(k)
        victims = []
        while (v := policy.evict(lambda k: True)) is not None:
            victims.append(v)
            assert len(victims) <= len(keys)
        assert sorted(victims) == keys
        assert len(policy) == 0

    @pytest.mark.conformance
    def test_never_evicts_an_unevictable_key(self, policy):
        for k in range(20):
            policy.on_insert(k)
        blocked = set(range(0, 20, 2))
        victims = []
        while (v := policy.evict(lambda k: k not in blocked)) is not None:
            victims.append(v)
        assert sorted(victims) == list(range(1, 20, 2))
        assert len(policy) == len(blocked)
        assert all(k in policy for k in blocked)

    @pytest.mark.conformance
    def test_removed_keys_are_forgotten(self, policy):
        for k in range(10):
            policy.on_insert(k)
        policy.on_remove(3)
        policy.on_remove(4)
        assert 3 not in policy and len(policy) == 8
        victims = set()
        while (v := policy.evict(lambda k: True)) is not None:
            victims.add(v)
        assert victims == set(range(10)) - {3, 4}

    @pytest.mark.conformance
    def test_reinsert_after_eviction(self, policy):
        policy.on_insert("a")
        assert policy.evict(lambda k: True) == "a"
        policy.on_insert("a")
        assert "a" in policy and len(policy) == 1
