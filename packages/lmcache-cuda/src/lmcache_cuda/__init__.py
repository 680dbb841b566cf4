"""lmcache-cuda: paged-KV transfer kernels behind one small C ABI, bound with cffi.

* :class:`~lmcache_cuda.paged.CPagedKV` - host memory (numpy arrays or torch
  CPU tensors), the C kernels;
* :class:`~lmcache_cuda.cuda.CudaPagedMemory` - GPU memory, the CUDA kernels
  into a :class:`~lmcache_cuda.pinned.PinnedArena`;
* :mod:`lmcache_cuda.reference` - the pure-torch oracle and fallback;
* :func:`paged_memory` - the best of these for an engine's tensors.

Nothing here links against libtorch: the kernels are plain shared libraries
(``csrc/lmcache_kernels.h`` is the whole ABI).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from lmcache_cuda.version import __version__

logger = logging.getLogger(__name__)

__all__ = ["__version__", "kernels_available", "paged_memory"]


def kernels_available() -> dict[str, bool]:
    """Which kernel libraries load here: ``{"c": ..., "cuda": ...}``."""
    from lmcache_cuda import _ffi

    return {"c": _ffi.cpu_lib() is not None, "cuda": _ffi.cuda_lib() is not None}


def paged_memory(layout: Any, layers: Sequence[Any]) -> Callable[[Sequence[int]], Any]:
    """A factory ``block_table -> reader/writer`` for an engine's per-layer KV tensors.

    Checks the tensors once. CUDA tensors use the CUDA kernels (checked by a
    test launch at start: missing or unusable kernels are an error naming the
    fix, or the torch reference with ``LMCACHE_CUDA_FALLBACK=torch``), host
    tensors the C kernels (the torch reference, with a warning, where no C
    compiler built them). On CUDA the factory is a
    :class:`~lmcache_cuda.cuda.CudaPagedMemory`, whose ``fence_saves`` an
    adapter calls before the engine's next step (see ``start_read``).
    """
    first = layers[0]
    on_gpu = getattr(getattr(first, "device", None), "type", "cpu") == "cuda"
    from lmcache_cuda import _ffi

    # Only the library these tensors need: a CPU worker must not build the CUDA
    # one (minutes of nvcc) just because nvcc is installed.
    if on_gpu:
        from lmcache_cuda.cuda import CudaPagedMemory

        # Refuses to start when the kernels are missing or do not run on this GPU,
        # unless LMCACHE_CUDA_FALLBACK=torch (see CudaPagedMemory).
        return CudaPagedMemory(layout, layers)  # callable: block_table -> reader/writer
    if _ffi.cpu_lib() is not None:
        from lmcache_cuda.paged import CPagedMemory

        return CPagedMemory(layout, layers)
    warnings.warn(
        "lmcache-cuda's C kernels are not built (no C compiler); using the torch reference",
        RuntimeWarning,
        stacklevel=2,
    )
    from lmcache_cuda.reference import TorchPagedKV

    return lambda table: TorchPagedKV(layout, layers, table)
