"""Version of the lmcache-server distribution (read by hatchling)."""

__version__ = "0.1.0"
