"""Hypothesis state machines that drive a backend or a policy against a plain model.

``backend_state_machine(factory)`` checks, after every step, that the backend
agrees with a dict of what was stored: bytes are never wrong, a key vanishes
only by eviction (and never while pinned), removals stick, capacity holds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from lmcache_core.backends.base import StorageBackend
from lmcache_core.eviction.base import EvictionPolicy
from lmcache_core.testing.chunks import ChunkFactory, chunk_payload, test_key

BackendFactory = Callable[[int, int], StorageBackend]

_KEY_IDS = st.integers(min_value=0, max_value=24)
_OWNERS = st.sampled_from(["req-a", "req-b", "req-c"])


def _size_for(i: int, slot_bytes: int) -> int:
    # Deterministic per key: a key names immutable content, sizes included.
    return slot_bytes if i % 3 else max(1, (slot_bytes * (i + 1)) // 29)


def backend_state_machine(
    factory: BackendFactory,
    *,
    slot_bytes: int = 4096,
    capacity_chunks: int = 6,
    max_examples: int = 60,
) -> type[RuleBasedStateMachine]:
    """A ``RuleBasedStateMachine`` class for backends made by ``factory(capacity, slot)``.

    Use its ``TestCase`` attribute as a test class.
    """

    class BackendStateMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.chunks = ChunkFactory(slot_bytes, num_slots=64)
            self.backend = factory(capacity_chunks * slot_bytes, slot_bytes)
            self.caps = self.backend.capabilities
            self.model: dict[int, bytes] = {}
            self.pins: dict[str, set[int]] = {}

        def pinned(self) -> set[int]:
            return set().union(*self.pins.values()) if self.pins else set()

        def _vanished(self, i: int) -> None:
            """The backend lost key ``i``: legal only by eviction of an unpinned key."""
            assert self.caps.evicts, f"key {i} vanished from a backend that does not evict"
            assert i not in self.pinned(), f"pinned key {i} was evicted"
            del self.model[i]

        @rule(i=_KEY_IDS)
        def put(self, i: int) -> None:
            n = _size_for(i, slot_bytes)
            c = self.chunks.make(test_key(i), n)
            try:
                (ok,) = self.backend.put([c])
            finally:
                c.release()
            if ok:
                self.model[i] = chunk_payload(test_key(i), n)
            else:
                assert self.caps.evicts and self.pinned(), (
                    "put refused a chunk although nothing is pinned"
                )
            # Eviction may have removed other keys; the checks below catch lies.

        @rule(i=_KEY_IDS)
        def get(self, i: int) -> None:
            (c,) = self.backend.get([test_key(i)], self.chunks.allocate)
            if c is None:
                if i in self.model:
                    self._vanished(i)
                return
            try:
                assert i in self.model, (
                    f"key {i} was never stored (or was removed) but get found it"
                )
                assert c.key == test_key(i)
                assert bytes(c.view) == self.model[i], f"wrong bytes for key {i}"
            finally:
                c.release()

        @rule(ids=st.lists(_KEY_IDS, max_size=6))
        def contains(self, ids: list[int]) -> None:
            found = self.backend.contains([test_key(i) for i in ids])
            assert len(found) == len(ids)
            for i, ok in zip(ids, found):
                if ok:
                    assert i in self.model, f"contains() reports key {i}, which is not stored"
                elif i in self.model:
                    self._vanished(i)

        @rule(i=_KEY_IDS)
        def remove(self, i: int) -> None:
            n = self.backend.remove([test_key(i)])
            if i in self.model:
                if n == 0:
                    self._vanished(i)
                else:
                    del self.model[i]
            else:
                assert n == 0, f"remove() removed key {i}, which is not stored"
            assert self.backend.contains([test_key(i)]) == [False]
            for held in self.pins.values():
                held.discard(i)

        @precondition(lambda self: self.caps.pinning)
        @rule(ids=st.lists(_KEY_IDS, max_size=4), owner=_OWNERS)
        def pin(self, ids: list[int], owner: str) -> None:
            # What is stored is what the backend says; refresh the model first.
            found = self.backend.contains([test_key(i) for i in ids])
            for i, ok in zip(ids, found):
                if not ok and i in self.model:
                    self._vanished(i)
            n = self.backend.pin([test_key(i) for i in ids], owner, 1e6)
            stored = [i for i in ids if i in self.model]
            assert n == len(stored)
            self.pins.setdefault(owner, set()).update(stored)

        @precondition(lambda self: self.caps.pinning)
        @rule(owner=_OWNERS)
        def unpin(self, owner: str) -> None:
            self.backend.unpin(owner)
            self.pins.pop(owner, None)

        @rule()
        def concurrent_gets(self) -> None:
            ids = sorted(self.model)
            wrong: list[int] = []

            def reader() -> None:
                for i in ids:
                    (c,) = self.backend.get([test_key(i)], self.chunks.allocate)
                    if c is not None:
                        if bytes(c.view) != self.model[i]:
                            wrong.append(i)
                        c.release()

            threads = [threading.Thread(target=reader) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not wrong, f"concurrent readers saw wrong bytes for {wrong}"

        @invariant()
        def capacity_holds(self) -> None:
            assert 0 <= self.backend.used_bytes <= self.backend.capacity_bytes

        @invariant()
        def pinned_keys_are_present(self) -> None:
            pinned = sorted(self.pinned())
            if pinned:
                assert all(self.backend.contains([test_key(i) for i in pinned]))

        def teardown(self) -> None:
            self.backend.close()
            self.chunks.close()

    BackendStateMachine.TestCase.settings = settings(
        max_examples=max_examples, stateful_step_count=40, deadline=None
    )
    return BackendStateMachine


def eviction_state_machine(
    factory: Callable[[], EvictionPolicy], *, max_examples: int = 100
) -> type[RuleBasedStateMachine]:
    """A state machine checking a policy against a set of tracked keys."""

    class PolicyStateMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.policy = factory()
            self.tracked: set[Hashable] = set()
            self.blocked: set[Hashable] = set()

        @rule(k=_KEY_IDS)
        def insert(self, k: int) -> None:
            if k not in self.tracked:
                self.policy.on_insert(k)
                self.tracked.add(k)

        @rule(k=_KEY_IDS)
        def access(self, k: int) -> None:
            if k in self.tracked:
                self.policy.on_access(k)

        @rule(k=_KEY_IDS)
        def remove(self, k: int) -> None:
            if k in self.tracked:
                self.policy.on_remove(k)
                self.tracked.discard(k)

        @rule(k=_KEY_IDS)
        def block(self, k: int) -> None:
            self.blocked ^= {k}

        @rule()
        def evict(self) -> None:
            victim = self.policy.evict(lambda key: key not in self.blocked)
            evictable = self.tracked - self.blocked
            if victim is None:
                assert not evictable, f"evict() gave up although {sorted(evictable)} are evictable"
            else:
                assert victim in evictable, f"evict() chose {victim!r}, not an evictable key"
                self.tracked.discard(victim)

        @invariant()
        def accounting(self) -> None:
            assert len(self.policy) == len(self.tracked)
            for k in range(25):
                assert (k in self.policy) == (k in self.tracked)

    PolicyStateMachine.TestCase.settings = settings(max_examples=max_examples, deadline=None)
    return PolicyStateMachine
