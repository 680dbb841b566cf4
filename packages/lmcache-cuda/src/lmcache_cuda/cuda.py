"""``CudaPagedKV``: the transfer protocol for KV in GPU memory, on the CUDA kernels.

Chunks move between the engine's paged device tensors and pool slots in a
:class:`~lmcache_cuda.pinned.PinnedArena` by one kernel launch per chunk on
the engine's stream: the GPU writes into (reads from) pinned host memory
over PCIe, no staging copy. A chunk buffer outside a pinned arena (or a
machine without the CUDA library) goes through the torch reference instead.

torch is used for what the engine already has in torch: the device, the
stream, and a small device copy of the block table and plane addresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lmcache_core.errors import LayoutError
from lmcache_core.layout import KVLayout
from lmcache_core.transfer import ChunkIO, check_chunk

from lmcache_cuda import _ffi
from lmcache_cuda.paged import Planes, layer_planes
from lmcache_cuda.pinned import is_pinned
from lmcache_cuda.reference import TorchPagedKV


class CudaPagedMemory:
    """An engine's device KV tensors, described once; ``request(table)`` per request."""

    def __init__(self, layout: KVLayout, layers: Sequence[torch.Tensor]) -> None:
        if not layers or layers[0].device.type != "cuda":
            raise LayoutError("CudaPagedMemory needs CUDA tensors")
        self.layout = layout
        self.layers = list(layers)
        self.device = layers[0].device
        # layer_planes checks shapes, dtypes and strides; addresses are device addresses.
        self.planes: Planes = layer_planes(layout, [_AddressOnly(t) for t in layers])
        self.lib = _ffi.cuda_lib()
        self.base_align = base_alignment(self.planes.bases)
        self._bases = torch.tensor(
            [b - (1 << 64) if b >= 1 << 63 else b for b in self.planes.bases],
            dtype=torch.int64,
            device=self.device,
        )

    def request(self, block_table: Sequence[int]) -> CudaPagedKV:
        return CudaPagedKV(self, block_table)


def base_alignment(bases: Sequence[int], cap: int = 256) -> int:
    """The largest power of two (up to ``cap``) dividing every plane base address.

    The kernel reads the bases from device memory; it learns their alignment
    from here before it picks a word width (a view into a tensor can start at
    any element, and a 16-byte load from an 8-byte-aligned base faults).
    """
    align = cap
    for b in bases:
        while align > 1 and b % align:
            align //= 2
    return align


class _AddressOnly:
    """A torch CUDA tensor seen by ``layer_planes`` (which wants host-side metadata)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._t = t
        self.shape = tuple(t.shape)
        self.device = torch.device("cpu")  # passes layer_planes' host-memory check

    def data_ptr(self) -> int:
        return int(self._t.data_ptr())

    def element_size(self) -> int:
        return int(self._t.element_size())

    def is_contiguous(self) -> bool:
        return bool(self._t.is_contiguous())

    def stride(self) -> tuple[int, ...]:
        return tuple(self._t.stride())


class CudaPagedKV:
    def __init__(self, memory: CudaPagedMemory, block_table: Sequence[int]) -> None:
        self.memory = memory
        table = [int(b) for b in block_table]
        nb = memory.planes.num_blocks
        if table and (min(table) < 0 or max(table) >= nb):
            raise LayoutError(f"block table refers to blocks outside [0, {nb})")
        self.table_host = table
        self.table = torch.tensor(table, dtype=torch.int64, device=memory.device)
        self._fallback: TorchPagedKV | None = None

    def _reference(self) -> TorchPagedKV:
        if self._fallback is None:
            self._fallback = TorchPagedKV(self.memory.layout, self.memory.layers, self.table_host)
        return self._fallback

    def _launch(self, fn: Any, chunk: ChunkIO, lo: int, hi: int, buf_addr: int) -> None:
        m = self.memory
        ffi = _ffi.ffi()
        p = m.planes
        need = -(-hi // p.rows_per_block)
        if need > len(self.table_host):
            raise LayoutError(
                f"tokens up to {hi} need {need} blocks, the table has {len(self.table_host)}"
            )
        desc = ffi.new(
            "lmc_paged *",
            {
                "num_planes": len(p.bases),
                "plane_base": ffi.cast("uint64_t *", m._bases.data_ptr()),
                "block_stride": p.block_stride,
                "row_stride": p.row_stride,
                "row_bytes": p.row_bytes,
                "rows_per_block": p.rows_per_block,
                "num_blocks": p.num_blocks,
                "base_align": m.base_align,
                "row_segments": p.row_segments,
                "segment_stride": p.segment_stride,
            },
        )
        stream = ffi.cast("void *", torch.cuda.current_stream(m.device).cuda_stream)
        rc = fn(
            desc,
            ffi.cast("int64_t *", self.table.data_ptr()),
            len(self.table_host),
            lo,
            hi,
            ffi.cast("void *", buf_addr),
            chunk.start,
            chunk.num_tokens,
            stream,
        )
        if rc != 0:
            err = ffi.string(m.lib.lmc_cuda_last_error()).decode() if rc == -3 else ""
            raise LayoutError(f"lmcache CUDA kernel failed (code {rc}) {err}".strip())

    def _split(self, chunks: Sequence[ChunkIO]) -> tuple[list[tuple[ChunkIO, int]], list[ChunkIO]]:
        fast, slow = [], []
        ffi = _ffi.ffi()
        whole_blocks = self.memory.planes.rows_per_block == 1 and self.memory.layout.block_size > 1
        for c in chunks:
            check_chunk(self.memory.layout, c)
            addr = int(ffi.cast("uintptr_t", ffi.from_buffer(c.buffer)))
            if (
                self.memory.lib is not None
                and not whole_blocks
                and is_pinned(addr, c.buffer.nbytes)
            ):
                fast.append((c, addr))
            else:
                slow.append(c)
        return fast, slow

    def _sync(self) -> None:
        torch.cuda.current_stream(self.memory.device).synchronize()

    def read_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        fast, slow = self._split(chunks)
        try:
            for c, addr in fast:
                self._launch(self.memory.lib.lmc_cuda_gather, c, c.start, c.end, addr)
        finally:
            # Also when a launch raised midway: the caller releases the chunks next,
            # and kernels queued before the failure must not write into reused slots.
            if fast:
                self._sync()  # the bytes must be in the buffers when this returns
        if slow:
            self._reference().read_chunks(slow)

    def write_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        fast, slow = self._split(chunks)
        try:
            for c, addr in fast:
                lo, hi = c.write_range
                if lo < hi:
                    self._launch(self.memory.lib.lmc_cuda_scatter, c, lo, hi, addr)
        finally:
            if fast:  # the chunks may be released (slots reused) once this returns
                self._sync()
        if slow:
            self._reference().write_chunks(slow)
