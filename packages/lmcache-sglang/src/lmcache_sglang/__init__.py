"""lmcache-sglang: not implemented yet (issue #7); only the package's version lives here."""

from lmcache_sglang.version import __version__

__all__ = ["__version__"]
