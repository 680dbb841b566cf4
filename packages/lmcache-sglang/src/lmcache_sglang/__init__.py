"""lmcache-sglang: lmcache as SGLang HiCache's storage layer (``LMCacheHiCacheStorage``).

Importing the backend needs SGLang; the package itself imports without it,
so ``module_path: lmcache_sglang`` works and a missing SGLang says what to do.
"""

from __future__ import annotations

from typing import Any

from lmcache_sglang.version import __version__

__all__ = ["LMCacheHiCacheStorage", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LMCacheHiCacheStorage":
        from lmcache_sglang.compat import check_sglang

        check_sglang()  # an older SGLang is refused here, with what to install
        try:
            from lmcache_sglang.storage import LMCacheHiCacheStorage
        except ImportError as e:
            if "sglang" in str(e):
                raise ImportError(
                    f"LMCacheHiCacheStorage needs SGLang ({e}); install sglang first"
                ) from e
            raise
        return LMCacheHiCacheStorage
    raise AttributeError(name)
