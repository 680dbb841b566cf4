"""``lmcache.utils``: the two helpers vLLM's in-tree LMCache connectors import from it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def init_logger(name: str) -> logging.Logger:
    """A logger under vLLM's (``vllm.lmcache.<name>``), so its lines reach vLLM's log."""
    return logging.getLogger(f"vllm.lmcache.{name}")


def _lmcache_nvtx_annotate(func: F) -> F:
    """Upstream annotates functions for NVTX profiles; here it changes nothing."""
    return func
