"""Version of the lmcache-sglang distribution (read by hatchling)."""

__version__ = "0.1.0"
