"""lmcache-nixl: not implemented yet (issue #6); only the package's version lives here."""

from lmcache_nixl.version import __version__

__all__ = ["__version__"]
