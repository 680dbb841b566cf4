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

import logging
import os
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

logger = logging.getLogger(__name__)


#: ``torch``: run on the torch reference (slow: per-layer index_select, synchronous
#: copies) when the CUDA kernels are missing or do not work on this GPU, instead of
#: refusing to start.
FALLBACK_ENV = "LMCACHE_CUDA_FALLBACK"


class CudaPagedMemory:
    """An engine's device KV tensors, described once; ``request(table)`` per request.

    At construction one tiny gather is launched and checked against the torch
    reference: a library built for another driver or GPU architecture fails
    here, at start, with what to do, not later as a slow path nobody notices
    (``LMCACHE_CUDA_FALLBACK=torch`` accepts the torch reference instead).
    """

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

        #: Side stream for saves, and the event of the last save copy queued on it.
        self._save_stream: Any = None
        self._load_stream: Any = None
        self._last_save: Any = None
        whole_blocks = self.planes.rows_per_block == 1 and layout.block_size > 1
        problem = None if whole_blocks else self._self_test()
        if problem is not None:
            if os.environ.get(FALLBACK_ENV, "").strip().lower() != "torch":
                raise LayoutError(
                    f"lmcache-cuda's CUDA kernels cannot run here: {problem}. Rebuild them "
                    "for this GPU and driver (pip install --force-reinstall --no-deps "
                    "./packages/lmcache-cuda on a machine whose nvcc matches the driver), or "
                    f"set {FALLBACK_ENV}=torch to run on the torch reference (much slower)"
                )
            logger.warning(
                "lmcache: CUDA kernels unusable (%s); %s=torch: every transfer uses the "
                "torch reference, which is much slower",
                problem,
                FALLBACK_ENV,
            )
            self.lib = None

    def _self_test(self) -> str | None:
        """Gather token 0 of block 0 with the kernel and with torch: why they differ, or None."""
        if self.lib is None:
            return "the library was not built (no nvcc when lmcache-cuda was installed)"
        kv = self.request([0])
        n = self.layout.chunk_bytes(1)
        out = torch.zeros(n, dtype=torch.uint8, device=self.device)
        try:
            kv._launch(self.lib.lmc_cuda_gather, ChunkIO(0, 1, memoryview(b"")), 0, 1,
                       int(out.data_ptr()))  # fmt: skip
            torch.cuda.current_stream(self.device).synchronize()
        except Exception as e:  # a launch refused, or an error surfacing at the sync
            return str(e).splitlines()[0] if str(e) else type(e).__name__
        ref = bytearray(n)
        TorchPagedKV(self.layout, self.layers, [0]).read_chunks([ChunkIO(0, 1, memoryview(ref))])
        if bytes(out.cpu().numpy().tobytes()) != bytes(ref):
            return "a test gather gave other bytes than the torch reference"
        return None

    def request(self, block_table: Sequence[int], device_table: Any = None) -> CudaPagedKV:
        """``device_table``: the same table already on the device (another layer's, in
        layer-wise copies), so it is not sent again."""
        return CudaPagedKV(self, block_table, device_table)

    __call__ = request  # the factory ``paged_memory`` returns

    def save_stream(self) -> Any:
        if self._save_stream is None:
            self._save_stream = torch.cuda.Stream(device=self.device)
        return self._save_stream

    def load_stream(self) -> Any:
        if self._load_stream is None:
            self._load_stream = torch.cuda.Stream(device=self.device)
        return self._load_stream

    def fence_saves(self) -> None:
        """Order the engine's stream after every save copy queued so far.

        Call before the engine's next step can write KV: a request whose saves
        are still being copied may have finished and its blocks may be handed
        to another request, which must not overwrite them before the copy read
        them. GPU-side ordering: the host does not wait.
        """
        if self._last_save is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_save)
            self._last_save = None


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
    def __init__(
        self, memory: CudaPagedMemory, block_table: Sequence[int], device_table: Any = None
    ) -> None:
        self.memory = memory
        table = [int(b) for b in block_table]
        nb = memory.planes.num_blocks
        if table and (min(table) < 0 or max(table) >= nb):
            raise LayoutError(f"block table refers to blocks outside [0, {nb})")
        self.table_host = table
        # From pinned memory without waiting: a pageable copy would stall the engine's
        # stream and its host thread at every step that saves or loads.
        if device_table is not None and device_table.numel() == len(table):
            self.table = device_table
        else:
            staged = torch.tensor(table, dtype=torch.int64).pin_memory()
            self.table = staged.to(memory.device, non_blocking=True)
        self._fallback: TorchPagedKV | None = None

    def _reference(self) -> TorchPagedKV:
        if self._fallback is None:
            self._fallback = TorchPagedKV(self.memory.layout, self.memory.layers, self.table_host)
        return self._fallback

    def _launch(
        self, fn: Any, chunk: ChunkIO, lo: int, hi: int, buf_addr: int, stream: Any = None
    ) -> None:
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
        if stream is None:
            stream = torch.cuda.current_stream(m.device)
        rc = fn(
            desc,
            ffi.cast("int64_t *", self.table.data_ptr()),
            len(self.table_host),
            lo,
            hi,
            ffi.cast("void *", buf_addr),
            chunk.start,
            chunk.num_tokens,
            ffi.cast("void *", stream.cuda_stream),
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

    def start_read(self, chunks: Sequence[ChunkIO]) -> Any:
        """Gather on the save stream after the work queued so far on the engine's stream;
        return at once with a completion (``lmcache_core.transfer.AsyncKVReader``).

        The engine's step does not wait for the copy. Until it is done the
        blocks it reads must not be rewritten: ``CudaPagedMemory.fence_saves``
        orders the engine's next step after it.
        """
        from lmcache_core.transfer import Finished

        fast, slow = self._split(chunks)
        if slow:
            self._reference().read_chunks(slow)  # synchronous torch copies
        if not fast:
            return Finished()
        m = self.memory
        side = m.save_stream()
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(m.device))
        side.wait_event(computed)  # the KV this step computed is written first
        self.table.record_stream(side)  # not reused while the side stream reads it
        try:
            for c, addr in fast:
                self._launch(m.lib.lmc_cuda_gather, c, c.start, c.end, addr, stream=side)
        except BaseException:
            side.synchronize()  # the caller frees the slots: nothing may still write them
            raise
        done = torch.cuda.Event()
        done.record(side)
        m._last_save = done
        return EventCompletion(done)

    def start_write(self, chunks: Sequence[ChunkIO]) -> Any:
        """Scatter on the load stream after the work queued so far on the engine's stream;
        return at once with a completion whose ``event`` the engine's stream waits on
        before it reads this KV (layer-wise loads: ``wait_for_layer_load``)."""
        from lmcache_core.transfer import Finished

        fast, slow = self._split(chunks)
        if slow:
            self._reference().write_chunks(slow)
        if not fast:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.memory.device))
            return EventCompletion(done) if slow else Finished()
        m = self.memory
        stream = m.load_stream()
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(m.device))
        stream.wait_event(ready)  # the blocks are allocated and nothing earlier writes them
        self.table.record_stream(stream)
        try:
            for c, addr in fast:
                lo, hi = c.write_range
                if lo < hi:
                    self._launch(m.lib.lmc_cuda_scatter, c, lo, hi, addr, stream=stream)
        except BaseException:
            stream.synchronize()
            raise
        done = torch.cuda.Event()
        done.record(stream)
        return EventCompletion(done)

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


class EventCompletion:
    """A gather queued on a CUDA stream, done when its event is."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> None:
        self.event.synchronize()
