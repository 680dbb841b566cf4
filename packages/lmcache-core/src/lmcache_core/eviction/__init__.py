"""Eviction policies (entry-point group ``lmcache.eviction_policies``)."""

from lmcache_core.eviction.base import EvictionPolicy

__all__ = ["EvictionPolicy"]
