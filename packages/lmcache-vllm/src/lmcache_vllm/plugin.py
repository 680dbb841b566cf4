"""lmcache's ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process.

It registers the model classes of :mod:`lmcache_vllm.blend.models` (vLLM's
own, noted once built, so a blend pass can run their modules). Registration
is lazy (``"module:Class"`` strings), so nothing is imported until vLLM
builds a model, and it may run many times.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.lmcache")


def register() -> None:
    try:
        from vllm import ModelRegistry
    except ImportError:  # vLLM missing or too old: nothing to register with
        return
    from lmcache_vllm.blend.models import SUPPORTED

    for arch in SUPPORTED:
        ModelRegistry.register_model(arch, f"lmcache_vllm.blend.models:{arch}")
