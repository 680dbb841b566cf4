"""``lmcache.integration.vllm.utils``: what vLLM's ``LMCacheMPConnector`` imports from it."""

from __future__ import annotations

from typing import Any


def mla_enabled(model_config: Any) -> bool:
    """Whether the model uses multi-head latent attention (one KV latent per token,
    the same on every tensor-parallel rank)."""
    return bool(getattr(model_config, "use_mla", False))
