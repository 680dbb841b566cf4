"""``lmcache server``: one cache per host, shared by every engine on it (MP mode).

The server owns the DRAM tier, in a shared-memory arena every client maps, and
the tiers below it (disk, Redis/Valkey, S3, shared filesystems, peers) with
write-behind, the index, eviction, pins, aliases, metrics and per-tenant
quotas. Engines (vLLM, SGLang) connect through
:class:`lmcache_core.mp.client.ServerChunkStore`; they keep hashing their
prompts and copying KV with their own kernels, straight into the server's
slots. It outlives them: a restarted engine finds what it stored.
"""

from lmcache_server.server import CacheServer
from lmcache_server.version import __version__

__all__ = ["CacheServer", "__version__"]
