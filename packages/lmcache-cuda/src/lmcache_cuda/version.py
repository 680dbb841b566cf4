"""Version of the lmcache-cuda distribution (read by hatchling)."""

__version__ = "0.1.0"
