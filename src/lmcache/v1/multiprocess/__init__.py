"""Upstream LMCache's ``lmcache.v1.multiprocess`` paths that vLLM imports."""
