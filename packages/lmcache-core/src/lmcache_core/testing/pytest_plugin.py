"""pytest plugin (entry point ``pytest11``): markers used by lmcache test suites.

* ``gpu``: needs a CUDA device; skipped where there is none.
* ``conformance``: a test from ``lmcache_core.testing``'s shipped suites.
* ``slow``: takes more than a few seconds.
"""

from __future__ import annotations

import functools
import shutil
from typing import Any


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "conformance: a shipped lmcache conformance test")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when a CUDA device answers (nvidia-smi lists one)."""
    import subprocess

    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    import pytest

    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
