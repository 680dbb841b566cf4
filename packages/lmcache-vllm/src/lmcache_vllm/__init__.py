"""lmcache-vllm: not implemented yet (issue #3); only the package's version lives here."""

from lmcache_vllm.version import __version__

__all__ = ["__version__"]
