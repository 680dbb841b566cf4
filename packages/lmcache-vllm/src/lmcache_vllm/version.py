"""Version of the lmcache-vllm distribution (read by hatchling)."""

__version__ = "0.1.0"
