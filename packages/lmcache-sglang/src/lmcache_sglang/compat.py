"""The SGLang releases this adapter supports (its HiCache storage interface).

``minimum`` is the release the tests run against (``tools/requirements-sglang-cpu.txt``
installs it, ``tests/test_packaging.py`` checks that it is what runs), ``below``
the first release not tried: HiCache's storage interface (``HiCacheStorage``,
its config and its batch calls) changes between SGLang releases. The same range
is the package's extra ``lmcache-sglang[engine]``; a test keeps them equal.
"""

from __future__ import annotations

from lmcache_core.adapter_kit import EngineRange

SUPPORTED_SGLANG = EngineRange("SGLang", ("sglang",), minimum="0.5.23", below="0.6")


def check_sglang(version: str | None = None) -> None:
    """Refuse an SGLang older than :data:`SUPPORTED_SGLANG` (ImportError that says what to
    install); warn, once, about a newer one."""
    SUPPORTED_SGLANG.check(version, error=ImportError)
