"""lmcache-cuda: not implemented yet (issue #4); only the package's version lives here."""

from lmcache_cuda.version import __version__

__all__ = ["__version__"]
