"""Upstream LMCache's ``lmcache.v1`` paths that vLLM imports (MP mode's types)."""
