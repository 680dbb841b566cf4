"""Storage backends (entry-point group ``lmcache.backends``)."""

from lmcache_core.backends.base import BackendCapabilities, BackendContext, StorageBackend

__all__ = ["BackendCapabilities", "BackendContext", "StorageBackend"]
