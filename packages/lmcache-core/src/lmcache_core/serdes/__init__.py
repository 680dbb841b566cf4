"""Serdes: how a chunk becomes bytes for disk and remote tiers (group ``lmcache.serdes``)."""

from lmcache_core.serdes.base import ChunkHeader, Serde, SerdeError

__all__ = ["ChunkHeader", "Serde", "SerdeError"]
