"""``CPagedKV``: lmcache-core's transfer protocol over host memory, on the C kernels.

An engine's per-layer KV tensors (numpy arrays, or torch CPU tensors: anything
with a data pointer) are described once as *planes* (see ``csrc/lmcache_kernels.h``);
each ``read_chunks`` / ``write_chunks`` then costs one C call per chunk, which
releases the GIL and copies with a few threads.

Every argument is checked here, in Python, with a message that says what is
wrong, before the C code (which checks again) touches memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from lmcache_core.errors import LayoutError
from lmcache_core.layout import KVLayout, LayoutKind
from lmcache_core.transfer import ChunkIO, check_chunk

from lmcache_cuda import _ffi


@dataclass(frozen=True)
class Planes:
    """The paged memory of one engine as the C ABI sees it (``lmc_paged``)."""

    bases: tuple[int, ...]
    block_stride: int
    row_stride: int
    row_bytes: int
    rows_per_block: int
    num_blocks: int
    #: A row in paged memory is ``row_segments`` runs of ``row_bytes // row_segments``
    #: bytes, ``segment_stride`` apart (one per KV head in vLLM's strided views).
    row_segments: int = 1
    segment_stride: int = 0


@dataclass(frozen=True)
class _TensorInfo:
    addr: int
    shape: tuple[int, ...]
    element_size: int
    contiguous: bool
    strides: tuple[int, ...]  # in bytes


def _tensor_info(t: Any, i: int) -> _TensorInfo:
    """Address, shape, element size, contiguity and byte strides of an array or tensor."""
    if isinstance(t, np.ndarray):
        return _TensorInfo(
            int(t.__array_interface__["data"][0]),
            tuple(t.shape),
            t.dtype.itemsize,
            bool(t.flags.c_contiguous),
            tuple(int(s) for s in t.strides),
        )
    if hasattr(t, "data_ptr") and hasattr(t, "element_size"):
        if getattr(t, "device", None) is not None and t.device.type != "cpu":
            raise LayoutError(f"layer {i} is on {t.device}; CPagedKV moves host memory only")
        es = int(t.element_size())
        return _TensorInfo(
            int(t.data_ptr()),
            tuple(t.shape),
            es,
            bool(t.is_contiguous()),
            tuple(int(s) * es for s in t.stride()),
        )
    raise LayoutError(f"layer {i} is a {type(t).__name__}, not a numpy array or torch tensor")


def _bhnc_planes(layout: KVLayout, infos: list[_TensorInfo]) -> Planes:
    """Planes of vLLM's strided ``[blocks, heads, block_size, K|V]`` views.

    A token's K in one layer is one run of ``head_size`` elements per head, the
    heads ``stride(1)`` apart; V is the same ``head_size`` elements further on.
    Every layer must share the strides (vLLM's layouts do).
    """
    bs, h, d, es = layout.block_size, layout.num_kv_heads, layout.head_size, layout.element_size
    first = infos[0]
    bases: list[int] = []
    for i, info in enumerate(infos):
        if info.shape != (first.shape[0], h, bs, 2 * d):
            raise LayoutError(
                f"layer {i} has shape {info.shape}, expected "
                f"{(first.shape[0], h, bs, 2 * d)} for {layout.kind.value}"
            )
        if info.strides != first.strides:
            raise LayoutError(
                f"layer {i} has byte strides {info.strides}, layer 0 {first.strides}; "
                "lmcache needs one layout for every layer"
            )
        bases += [info.addr, info.addr + d * es]
    block, head, token, elem = first.strides
    if elem != es or min(block, head, token) <= 0:
        raise LayoutError(
            f"the last dimension (K|V of one head) must be dense and the other strides "
            f"positive; byte strides are {first.strides}"
        )
    return Planes(
        tuple(bases),
        block_stride=block,
        row_stride=token,
        row_bytes=h * d * es,
        rows_per_block=bs,
        num_blocks=first.shape[0],
        row_segments=h,
        segment_stride=head if h > 1 else 0,
    )


def _mla_planes(layout: KVLayout, infos: list[_TensorInfo]) -> Planes:
    """Planes of MLA's latent caches: ``[blocks, block_size, dim]``, or vLLM's
    ``[blocks, 1, block_size, dim]`` views, with any strides (the last dense)."""
    bs, d, es = layout.block_size, layout.head_size, layout.element_size
    first = infos[0]
    for i, info in enumerate(infos):
        nb = info.shape[0] if info.shape else 0
        if info.shape not in ((nb, bs, d), (nb, 1, bs, d)) or info.shape != first.shape:
            raise LayoutError(
                f"layer {i} has shape {info.shape}, expected ({nb}, {bs}, {d}) or "
                f"({nb}, 1, {bs}, {d}) for mla, the same for every layer"
            )
        if info.strides != first.strides:
            raise LayoutError(
                f"layer {i} has byte strides {info.strides}, layer 0 {first.strides}; "
                "lmcache needs one layout for every layer"
            )
    block, token, elem = first.strides[0], first.strides[-2], first.strides[-1]
    if elem != es or min(block, token) <= 0:
        raise LayoutError(
            f"the latent dimension must be dense and the other strides positive; byte "
            f"strides are {first.strides}"
        )
    row = d * es
    return Planes(tuple(i.addr for i in infos), block, token, row, bs, first.shape[0])


def layer_planes(layout: KVLayout, layers: Sequence[Any]) -> Planes:
    """Describe per-layer tensors of ``layout`` as planes, checking every tensor."""
    if len(layers) != layout.num_layers:
        raise LayoutError(f"expected {layout.num_layers} layer tensors, got {len(layers)}")
    kind = layout.kind
    bs, h, d, es = layout.block_size, layout.num_kv_heads, layout.head_size, layout.element_size
    infos = [_tensor_info(t, i) for i, t in enumerate(layers)]
    for i, info in enumerate(infos):
        if info.element_size != es:
            raise LayoutError(
                f"layer {i} has {info.element_size}-byte elements, layout says {es} "
                f"({layout.dtype})"
            )
    if kind is LayoutKind.VLLM_BHNC:
        return _bhnc_planes(layout, infos)
    if kind is LayoutKind.MLA:
        return _mla_planes(layout, infos)
    bases: list[int] = []
    num_blocks = None
    for i, info in enumerate(infos):
        addr, shape = info.addr, info.shape
        if not info.contiguous:
            raise LayoutError(f"layer {i} must be contiguous (call .contiguous() on it)")
        nb = shape[1] if kind is LayoutKind.VLLM_FLASH else shape[0]
        expect = {
            LayoutKind.VLLM_FLASH: (2, nb, bs, h, d),
            LayoutKind.VLLM_FLASH_BLOCKS_FIRST: (nb, 2, bs, h, d),
            LayoutKind.VLLM_CPU: (nb, h, bs, 2 * d),
            LayoutKind.MLA: (nb, bs, d),
        }.get(kind)
        if expect is None:
            raise LayoutError(
                f"layout {kind.value} keeps K and V in separate buffers: build its planes "
                "with CPagedKV.from_planes"
            )
        if shape != expect:
            raise LayoutError(f"layer {i} has shape {shape}, expected {expect} for {kind.value}")
        if num_blocks is None:
            num_blocks = nb
        elif nb != num_blocks:
            raise LayoutError(f"layer {i} has {nb} blocks, layer 0 has {num_blocks}")
        row = h * d * es
        if kind is LayoutKind.VLLM_FLASH:
            bases += [addr, addr + nb * bs * row]
        elif kind is LayoutKind.VLLM_FLASH_BLOCKS_FIRST:
            bases += [addr, addr + bs * row]
        else:
            bases.append(addr)
    assert num_blocks is not None
    row = h * d * es
    if kind is LayoutKind.VLLM_FLASH:
        return Planes(tuple(bases), bs * row, row, row, bs, num_blocks)
    if kind is LayoutKind.VLLM_FLASH_BLOCKS_FIRST:
        return Planes(tuple(bases), 2 * bs * row, row, row, bs, num_blocks)
    if kind is LayoutKind.VLLM_CPU:
        block = h * bs * 2 * d * es  # opaque: one row per block
        return Planes(tuple(bases), block, block, block, 1, num_blocks)
    row = d * es  # MLA
    return Planes(tuple(bases), bs * row, row, row, bs, num_blocks)


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class CPagedMemory:
    """An engine's host KV memory described once for the C kernels; ``request(table)`` per
    request."""

    def __init__(
        self,
        layout: KVLayout,
        layers: Sequence[Any] | None = None,
        *,
        planes: Planes | None = None,
        keepalive: Sequence[Any] = (),
        threads: int | None = None,
    ) -> None:
        lib = _ffi.cpu_lib()
        if lib is None:
            raise LayoutError(
                "lmcache-cuda's C kernels are not built and no C compiler is available; "
                "install gcc and reinstall lmcache-cuda, or use the torch reference"
            )
        if planes is None:
            if layers is None:
                raise LayoutError("give the engine's layer tensors or their planes")
            planes = layer_planes(layout, layers)
            keepalive = list(layers)
        else:
            expect = layout.num_layers * layout.kv_planes
            if len(planes.bases) != expect:
                raise LayoutError(
                    f"expected {expect} planes (layers x K/V), got {len(planes.bases)}"
                )
        self.lib = lib
        self.layout = layout
        self.planes = planes
        self.threads = default_threads() if threads is None else max(1, threads)
        self._keepalive = list(keepalive)
        ffi = _ffi.ffi()
        self._bases = ffi.new("uint64_t[]", list(planes.bases))
        self.desc = ffi.new(
            "lmc_paged *",
            {
                "num_planes": len(planes.bases),
                "plane_base": self._bases,
                "block_stride": planes.block_stride,
                "row_stride": planes.row_stride,
                "row_bytes": planes.row_bytes,
                "rows_per_block": planes.rows_per_block,
                "num_blocks": planes.num_blocks,
                "row_segments": planes.row_segments,
                "segment_stride": planes.segment_stride,
            },
        )

    def request(self, block_table: Sequence[int]) -> CPagedKV:
        kv = CPagedKV.__new__(CPagedKV)
        kv._bind(self, block_table)
        return kv

    __call__ = request  # the factory ``paged_memory`` returns


class CPagedKV:
    """Reader and writer over an engine's host KV memory and one request's block table."""

    def __init__(
        self,
        layout: KVLayout,
        layers: Sequence[Any],
        block_table: Sequence[int],
        *,
        threads: int | None = None,
    ) -> None:
        self._bind(CPagedMemory(layout, layers, threads=threads), block_table)

    @classmethod
    def from_planes(
        cls,
        layout: KVLayout,
        planes: Planes,
        block_table: Sequence[int],
        *,
        keepalive: Sequence[Any] = (),
        threads: int | None = None,
    ) -> CPagedKV:
        """For layouts the engine describes itself (SGLang's separate K and V buffers)."""
        mem = CPagedMemory(layout, planes=planes, keepalive=keepalive, threads=threads)
        return mem.request(block_table)

    def _bind(self, memory: CPagedMemory, block_table: Sequence[int]) -> None:
        self.memory = memory
        self.lib = memory.lib
        self.layout = memory.layout
        self.planes = memory.planes
        self.threads = memory.threads
        self._desc = memory.desc
        self.table = np.ascontiguousarray(block_table, dtype=np.int64)
        nb = self.planes.num_blocks
        if self.table.size and (self.table.min() < 0 or self.table.max() >= nb):
            raise LayoutError(f"block table refers to blocks outside [0, {nb})")
        self._table_ptr = _ffi.ffi().cast("int64_t *", self.table.ctypes.data)

    # ------------------------------------------------------------------ rows

    def _rows(self, lo: int, hi: int) -> tuple[int, int]:
        """Token range -> row range (rows are blocks for whole-block layouts)."""
        if self.layout.kind is LayoutKind.VLLM_CPU:
            bs = self.layout.block_size
            return lo // bs, -(-hi // bs)
        return lo, hi

    def _check_table(self, row_hi: int) -> None:
        rpb = self.planes.rows_per_block
        need = -(-row_hi // rpb)
        if need > len(self.table):
            raise LayoutError(
                f"rows up to {row_hi} need {need} blocks, the block table has {len(self.table)}"
            )

    def _call(self, fn: Any, chunk: ChunkIO, lo: int, hi: int, buf: Any) -> None:
        r0, r1 = self._rows(chunk.start, chunk.end)
        w0, w1 = self._rows(lo, hi)
        self._check_table(w1)
        rc = fn(
            self._desc, self._table_ptr, len(self.table), w0, w1, buf, r0, r1 - r0, self.threads
        )
        if rc != 0:
            raise LayoutError(f"lmcache C kernel refused the copy (code {rc}): arguments disagree")

    def read_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        ffi = _ffi.ffi()
        for chunk in chunks:
            check_chunk(self.layout, chunk)
            if chunk.buffer.readonly:
                raise LayoutError("chunk buffer to read into is read-only")
            buf = ffi.from_buffer(chunk.buffer)
            self._call(self.lib.lmc_cpu_gather, chunk, chunk.start, chunk.end, buf)

    def write_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        ffi = _ffi.ffi()
        for chunk in chunks:
            check_chunk(self.layout, chunk)
            lo, hi = chunk.write_range
            if lo >= hi:
                continue
            buf = ffi.from_buffer(chunk.buffer)
            self._call(self.lib.lmc_cpu_scatter, chunk, lo, hi, buf)


def available() -> bool:
    """Are the C kernels usable here?"""
    return _ffi.cpu_lib() is not None
