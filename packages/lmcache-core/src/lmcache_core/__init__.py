"""lmcache-core: the engine-agnostic, torch-free core of lmcache.

Data path, top to bottom: :class:`CacheEngine` (lookup / store / retrieve)
-> :mod:`~lmcache_core.transfer` (engine memory <-> chunk buffers)
-> :class:`~lmcache_core.pool.SlotPool` (chunks in one arena)
-> :class:`~lmcache_core.backends.StorageBackend` tiers.
"""

from lmcache_core.arena import AnonymousArena, Arena
from lmcache_core.backends import BackendCapabilities, BackendContext, StorageBackend
from lmcache_core.backends.cpu import LocalCPUBackend
from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.errors import (
    ConfigError,
    LayoutError,
    LMCacheError,
    PluginAPIError,
    PluginNotFoundError,
    TokenError,
    UnsupportedCapabilityError,
)
from lmcache_core.eviction import EvictionPolicy
from lmcache_core.keys import CacheKey, ChunkSpan, KeyNamespace, MultimodalItem, TokenChunker
from lmcache_core.layout import KVLayout, LayoutKind
from lmcache_core.metrics import Metrics
from lmcache_core.plugin_api import PLUGIN_API_VERSION
from lmcache_core.pool import Chunk, SlotPool
from lmcache_core.transfer import ChunkIO, KVReader, KVWriter
from lmcache_core.version import __version__

__all__ = [
    "PLUGIN_API_VERSION",
    "AnonymousArena",
    "Arena",
    "BackendCapabilities",
    "BackendContext",
    "CacheConfig",
    "CacheEngine",
    "CacheKey",
    "Chunk",
    "ChunkIO",
    "ChunkSpan",
    "ConfigError",
    "EvictionPolicy",
    "KVLayout",
    "KVReader",
    "KVWriter",
    "KeyNamespace",
    "LMCacheError",
    "LayoutError",
    "LayoutKind",
    "LocalCPUBackend",
    "Metrics",
    "MultimodalItem",
    "PluginAPIError",
    "PluginNotFoundError",
    "SlotPool",
    "StorageBackend",
    "TokenChunker",
    "TokenError",
    "UnsupportedCapabilityError",
    "__version__",
]
