"""lmcache's ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process.

It registers the model classes of :mod:`lmcache_vllm.blend.models` (vLLM's
own, noted once built, so a blend pass can run their modules). Registration
is lazy (``"module:Class"`` strings), so nothing is imported until vLLM
builds a model, and it may run many times.

It also gives vLLM's built-in ``LMCacheConnectorV1`` lmcache's metrics and KV
events (:mod:`lmcache_vllm.builtin_name`): production-stack's chart uses that name.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.lmcache")


def register() -> None:
    try:
        from vllm import ModelRegistry
    except ImportError:  # vLLM missing or too old: nothing to register with
        return
    from lmcache_vllm.compat import SUPPORTED_VLLM

    problem = SUPPORTED_VLLM.problem()
    if problem is not None:  # said here (every process), refused when the connector loads
        logger.warning("lmcache-vllm: %s", problem)
        if SUPPORTED_VLLM.too_old():
            return
    from lmcache_vllm import builtin_name

    try:
        builtin_name.install()
    except Exception:  # never stop vLLM: the built-in name then runs as vLLM ships it
        logger.warning("lmcache: LMCacheConnectorV1 left as vLLM ships it", exc_info=True)
    from lmcache_vllm.blend.models import SUPPORTED

    for arch in SUPPORTED:
        ModelRegistry.register_model(arch, f"lmcache_vllm.blend.models:{arch}")
