"""Conformance suites shipped in the wheel, as zarr ships ``zarr.testing``.

A backend author gets the whole storage contract in a few lines::

    from lmcache_core.testing import StorageBackendTests, backend_state_machine

    class TestMyBackend(StorageBackendTests):
        def make_backend(self, capacity_bytes, slot_bytes):
            return MyBackend(capacity_bytes=capacity_bytes)

    TestMyBackendStateful = backend_state_machine(
        lambda capacity_bytes, slot_bytes: MyBackend(capacity_bytes=capacity_bytes)
    ).TestCase

Likewise :class:`EvictionPolicyTests` and :class:`SerdeTests`. They need the
``testing`` extra (pytest, hypothesis).
"""

from lmcache_core.testing.backend_tests import StorageBackendTests
from lmcache_core.testing.chunks import ChunkFactory, chunk_payload, test_key
from lmcache_core.testing.eviction_tests import EvictionPolicyTests
from lmcache_core.testing.serde_tests import SerdeTests
from lmcache_core.testing.stateful import backend_state_machine, eviction_state_machine

__all__ = [
    "ChunkFactory",
    "EvictionPolicyTests",
    "SerdeTests",
    "StorageBackendTests",
    "backend_state_machine",
    "chunk_payload",
    "eviction_state_machine",
    "test_key",
]
