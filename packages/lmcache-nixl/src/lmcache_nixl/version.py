"""Version of the lmcache-nixl distribution (read by hatchling)."""

__version__ = "0.1.0"
