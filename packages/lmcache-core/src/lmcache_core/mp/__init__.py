"""Multi-process (MP) mode: one ``lmcache server`` per host, shared by every engine there.

The server (package ``lmcache-server``) holds the DRAM tier in a shared-memory
arena and the lower tiers behind it; engines reach it through
:class:`~lmcache_core.mp.client.ServerChunkStore`, a chunk store whose chunks
are slots of that arena, so their kernels copy KV straight into and out of
it. The control plane (:mod:`lmcache_core.mp.wire`) is a Unix socket by
default; KV bytes never cross it.
"""
