"""Opening the kernel libraries with cffi (ABI mode: no compiled Python extension).

The declarations come from the shipped header itself, so the Python side and
the C side cannot drift apart. A library that is missing (a wheel built
without a compiler) is built now when a compiler is present; otherwise the
caller falls back to the torch reference, with a warning.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any

import cffi

from lmcache_cuda import build

logger = logging.getLogger(__name__)

_lock = threading.Lock()


def _cdef_source() -> str:
    text = (build.CSRC / "lmcache_kernels.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    keep = []
    skip_cplusplus = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#ifdef __cplusplus"):
            skip_cplusplus = True
            continue
        if skip_cplusplus:
            if s.startswith("#endif"):
                skip_cplusplus = False
            continue
        m = re.match(r"#define (LMC_\w+) (-?\d+)", s)
        if m:
            keep.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        if s.startswith("#"):
            continue
        keep.append(line)
    return "\n".join(keep)


@functools.cache
def ffi() -> cffi.FFI:
    f = cffi.FFI()
    f.cdef(_cdef_source())
    return f


def _open(name: str, builder: Any) -> Any | None:
    """Load library ``name``; (re)build it first if missing or built from other sources."""
    path = build.LIB_DIR / name
    with _lock:
        stale = path.exists() and build.is_stale(path, name)
        if not path.exists() or stale:
            try:
                builder()
                logger.info(
                    "lmcache-cuda: %s %s", "rebuilt (its sources changed)" if stale else "built",
                    name,
                )  # fmt: skip
            except (build.BuildError, OSError) as e:
                if not stale:
                    logger.debug("lmcache-cuda: cannot build %s: %s", name, e)
                    return None
                logger.warning(
                    "lmcache-cuda: %s was built from other sources and cannot be rebuilt here "
                    "(%s); using it as it is (its ABI version is still checked)", name, e,
                )  # fmt: skip
        lib = ffi().dlopen(str(path))
    if lib.lmc_abi_version() != lib.LMC_ABI_VERSION:
        raise ImportError(f"{path} has ABI {lib.lmc_abi_version()}, expected {lib.LMC_ABI_VERSION}")
    return lib


@functools.cache
def cpu_lib() -> Any | None:
    """The C library, or None (no library and no compiler to build one)."""
    return _open(build.CPU_LIB, build.build_cpu)


@functools.cache
def cuda_lib() -> Any | None:
    """The CUDA library, or None (not built, or no nvcc)."""
    return _open(build.CUDA_LIB, build.build_cuda)
