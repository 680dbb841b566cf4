"""``PinnedArena``: lmcache-core's arena protocol over page-locked, device-mapped host memory.

The CUDA kernels write a chunk straight from GPU memory into the pool slot
that will hold it (and read it back from there): no staging copy. That
needs the pool's memory pinned and mapped into the device's address space,
which ``cudaHostRegister`` does to the anonymous mapping core already makes.
The CUDA runtime comes with lmcache-cuda's own library (linked statically),
so no ``libcudart`` needs to be found.
"""

from __future__ import annotations

import threading

from lmcache_core.arena import AnonymousArena

from lmcache_cuda import _ffi

_lock = threading.Lock()
#: (start, end) of every registered arena: the CUDA path uses the kernels only
#: for chunk buffers inside one of them.
_REGISTERED: list[tuple[int, int]] = []


class CudaUnavailableError(RuntimeError):
    pass


def cuda_device_count() -> int:
    lib = _ffi.cuda_lib()
    return int(lib.lmc_cuda_device_count()) if lib is not None else 0


def is_pinned(address: int, nbytes: int) -> bool:
    return any(lo <= address and address + nbytes <= hi for lo, hi in _REGISTERED)


class PinnedArena(AnonymousArena):
    """An anonymous mapping registered with CUDA (pinned, mapped, portable)."""

    def __init__(self, size: int, *, populate: bool = True) -> None:
        lib = _ffi.cuda_lib()
        if lib is None or lib.lmc_cuda_device_count() == 0:
            raise CudaUnavailableError(
                "a pinned arena needs a CUDA GPU and lmcache-cuda's CUDA library "
                "(built when nvcc is present at install); use the anonymous arena instead"
            )
        super().__init__(size, populate=populate)
        self._lib = lib
        ptr = _ffi.ffi().cast("void *", self.address)
        if lib.lmc_cuda_host_register(ptr, self.size) != 0:
            err = _ffi.ffi().string(lib.lmc_cuda_last_error()).decode()
            super().close()
            raise CudaUnavailableError(f"pinning {self.size} bytes failed: {err}")
        self._range = (self.address, self.address + self.size)
        with _lock:
            _REGISTERED.append(self._range)

    def close(self) -> None:
        if getattr(self, "_range", None) is not None:
            with _lock:
                if self._range in _REGISTERED:
                    _REGISTERED.remove(self._range)
            self._lib.lmc_cuda_host_unregister(_ffi.ffi().cast("void *", self._range[0]))
            self._range = None
        super().close()


def dram_tier_arena(capacity: int) -> PinnedArena | None:
    """Pinned memory for a DRAM tier of ``capacity`` bytes (plus the pool's slot offset),
    so GPU kernels copy straight into it; None (pageable memory, torch copies) when it
    cannot be pinned, with a warning that says so."""
    import logging

    from lmcache_core.pool import SLOT_OFFSET

    try:
        return PinnedArena(capacity + SLOT_OFFSET)
    except (CudaUnavailableError, OSError) as e:
        logging.getLogger("vllm.lmcache").warning(
            "lmcache: DRAM tier not pinned (%s); GPU transfers use torch copies", e
        )
        return None


class PinnedMapping:
    """This process's mapping of an ``lmcache server``'s arena, registered with CUDA.

    In server mode the engine's kernels copy between GPU memory and the
    server's slots, which this process maps (shared memory); registering the
    mapping (``cudaHostRegister``, portable and mapped) lets them DMA into it
    directly, as into the pinned arena of the in-process mode.
    """

    def __init__(self, address: int, size: int) -> None:
        lib = _ffi.cuda_lib()
        if lib is None or lib.lmc_cuda_device_count() == 0:
            raise CudaUnavailableError("pinning the server's arena needs a CUDA GPU")
        if lib.lmc_cuda_host_register(_ffi.ffi().cast("void *", address), size) != 0:
            err = _ffi.ffi().string(lib.lmc_cuda_last_error()).decode()
            raise CudaUnavailableError(f"pinning the server's arena ({size} bytes) failed: {err}")
        self._lib = lib
        self._range: tuple[int, int] | None = (address, address + size)
        with _lock:
            _REGISTERED.append(self._range)

    def close(self) -> None:
        if self._range is None:
            return
        with _lock:
            if self._range in _REGISTERED:
                _REGISTERED.remove(self._range)
        self._lib.lmc_cuda_host_unregister(_ffi.ffi().cast("void *", self._range[0]))
        self._range = None


def pin_server_arena(mapping: object) -> PinnedMapping | None:
    """``on_map`` for a GPU engine in server mode: pin the mapping of the server's arena
    (``address``, ``size``); None, with a warning, when it cannot be pinned (copies then
    go through pageable memory: slower, still correct)."""
    import logging

    try:
        return PinnedMapping(int(mapping.address), int(mapping.size))  # type: ignore[attr-defined]
    except (CudaUnavailableError, OSError) as e:
        logging.getLogger("vllm.lmcache").warning(
            "lmcache: the server's arena is not pinned (%s); GPU copies will be slower", e
        )
        return None
