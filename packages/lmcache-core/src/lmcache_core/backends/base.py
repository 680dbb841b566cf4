"""The storage backend protocol: what every tier implements.

Small on purpose (as zarr's ``Store``): batched ``contains``, ``get``,
``put`` and ``remove``, plus capability flags that callers check instead of
catching ``NotImplementedError``. ``lmcache_core.testing`` holds the suite
every backend passes.

Data moves as :class:`~lmcache_core.pool.Chunk` objects, which live in the
memory pool:

* ``put`` receives chunks the caller owns. A zero-copy tier (the CPU tier)
  keeps a reference to the chunk itself; any other tier writes its bytes out.
  The caller still releases its own reference afterwards.
* ``get`` returns chunks the caller owns (one reference each) and must
  release. A zero-copy tier hands out its own chunk; any other tier fills a
  chunk from the ``allocator`` it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from lmcache_core.errors import UnsupportedCapabilityError
from lmcache_core.plugin_api import INHERITED_API_VERSION, check_api_version, describe

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig
    from lmcache_core.keys import CacheKey
    from lmcache_core.layout import KVLayout
    from lmcache_core.metrics import Metrics
    from lmcache_core.pool import Chunk, SlotPool

#: ``allocator(key, num_tokens, nbytes)`` -> a fresh chunk, or None when memory is full.
ChunkAllocator = Callable[["CacheKey", int, int], "Chunk | None"]


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do; callers check these flags."""

    #: Operations may complete in the background (writes are queued).
    asynchronous: bool = False
    #: ``get`` returns chunks without copying bytes (they live in the pool).
    zero_copy: bool = False
    #: Data survives a restart of the process.
    persistent: bool = False
    #: Other instances see the same data.
    shared: bool = False
    #: ``pin``/``unpin`` protect keys from eviction.
    pinning: bool = False
    #: The backend evicts by itself when full (``put`` never fails for space).
    evicts: bool = False
    #: ``keys()`` lists what is stored.
    listing: bool = True
    #: ``used_bytes`` is exactly what is stored (False for a shared store, where
    #: other instances write too and ``used_bytes`` counts this process's writes).
    exact_usage: bool = True


@dataclass
class BackendContext:
    """What a backend gets from the cache engine when it is built."""

    layout: KVLayout | None
    pool: SlotPool
    metrics: Metrics
    extra: dict[str, Any] = field(default_factory=dict)
    #: The deployment secret (``LMCACHE_AUTH_SECRET`` / ``auth_secret_file``), or None:
    #: tiers others can write to authenticate what they read with it.
    secret: bytes | None = None
    #: The engine's key namespace digest: a tier shared by several namespaces
    #: (one local disk for every tensor-parallel rank) keeps to its own.
    namespace: bytes | None = None


class StorageBackend(ABC):
    """One storage tier."""

    #: The name this backend is registered under in ``lmcache.backends``.
    name: ClassVar[str]
    #: The plugin API this backend is written for
    #: (:data:`~lmcache_core.plugin_api.PLUGIN_API_VERSION`). A third-party backend
    #: sets it; one that does not is checked by inspection.
    api_version: ClassVar[int] = INHERITED_API_VERSION
    #: The ``extra_config`` keys this backend reads: name -> one line on what it does.
    #: A key that no tier in use declares is reported when the config is loaded.
    extra_config_keys: ClassVar[Mapping[str, str]] = {}
    #: Below DRAM, the engine writes this tier behind, through a bounded queue.
    #: A tier whose writes are cheap and must be visible at once says False.
    write_behind: ClassVar[bool] = True
    #: Operations this backend answers from memory, never waiting on I/O (``"contains"``
    #: over an in-memory index): below DRAM they are called inline. Every other call
    #: the engine waits on runs on the tier's call threads, bounded by
    #: ``blocking_timeout_secs`` (:class:`~lmcache_core.tier.ManagedTier`).
    inline_ops: ClassVar[frozenset[str]] = frozenset()
    capabilities: ClassVar[BackendCapabilities]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A backend for a plugin API this lmcache-core does not serve fails here, as
        # its plugin is loaded, not in the middle of a read.
        check_api_version(cls, f"storage backend {describe(cls)}")

    @classmethod
    def from_config(cls, config: CacheConfig, context: BackendContext) -> StorageBackend:
        """Build the backend from the cache config; plugins override this."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_config")

    @abstractmethod
    def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        """Which keys are stored now. Never raises for a missing key."""

    @abstractmethod
    def get(self, keys: Sequence[CacheKey], allocator: ChunkAllocator) -> list[Chunk | None]:
        """The chunks of ``keys`` (None where missing or unreadable), owned by the caller."""

    @abstractmethod
    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Store ``chunks``; True for each one that is stored afterwards.

        A key already stored is left as it is (keys name immutable content).
        """

    @abstractmethod
    def remove(self, keys: Sequence[CacheKey]) -> int:
        """Remove ``keys``; returns how many were stored."""

    def keys(self) -> Iterator[CacheKey]:
        """Every stored key (capability ``listing``)."""
        raise UnsupportedCapabilityError(f"{self.name} backend cannot list its keys")

    def pin(self, keys: Sequence[CacheKey], owner: str, ttl_s: float) -> int:
        """Protect stored ``keys`` from eviction for ``owner``, for at most ``ttl_s`` seconds.

        Returns how many of them were stored (and are now pinned).
        """
        raise UnsupportedCapabilityError(f"{self.name} backend does not support pins")

    def unpin(self, owner: str) -> int:
        """Drop every pin ``owner`` holds; returns how many keys were unpinned."""
        raise UnsupportedCapabilityError(f"{self.name} backend does not support pins")

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes of chunk data stored now."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Most bytes of chunk data this backend will hold."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Idempotent."""
