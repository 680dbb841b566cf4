"""The pure-torch reference of the transfer protocol, for any device: the oracle and the fallback.

It moves KV between an engine's paged tensors (CUDA or CPU) and chunk buffers
with ``index_select``/``index_copy_`` per layer and K/V plane: simple enough
to be obviously right, so the C and CUDA kernels are tested against it, and
used when they are not built. Chunk bytes follow the layout's chunk format
(``lmcache_core.layout``). torch is imported here only: the kernels never
link against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lmcache_core.errors import LayoutError
from lmcache_core.layout import KVLayout, LayoutKind
from lmcache_core.transfer import ChunkIO, block_range, check_chunk


class TorchPagedKV:
    """Reader and writer over per-layer torch tensors and one request's block table."""

    def __init__(
        self, layout: KVLayout, layers: Sequence[torch.Tensor], block_table: Sequence[int]
    ):
        if len(layers) != layout.num_layers:
            raise LayoutError(f"expected {layout.num_layers} layer tensors, got {len(layers)}")
        self.layout = layout
        self.layers = list(layers)
        self.device = layers[0].device
        self.block_table = torch.as_tensor(list(block_table), dtype=torch.long)
        num_blocks = (
            layers[0].shape[1] if layout.kind is LayoutKind.VLLM_FLASH else layers[0].shape[0]
        )
        if len(self.block_table) and (
            int(self.block_table.min()) < 0 or int(self.block_table.max()) >= num_blocks
        ):
            raise LayoutError(f"block table refers to blocks outside [0, {num_blocks})")

    def _planes(self, layer: torch.Tensor) -> list[torch.Tensor]:
        """Per K/V plane, a view ``[num_blocks, block_size, row_bytes]`` of raw bytes
        (``[num_blocks, block_size, heads, head_bytes]`` for vLLM's strided views)."""
        raw = layer.view(torch.uint8) if layer.dtype != torch.uint8 else layer
        kind = self.layout.kind
        if kind is LayoutKind.VLLM_BHNC:
            half = self.layout.head_size * self.layout.element_size
            return [raw[..., :half].transpose(1, 2), raw[..., half:].transpose(1, 2)]
        if kind is LayoutKind.VLLM_FLASH:
            return [raw[p].reshape(raw.shape[1], raw.shape[2], -1) for p in (0, 1)]
        if kind is LayoutKind.VLLM_FLASH_BLOCKS_FIRST:
            return [raw[:, p].reshape(raw.shape[0], raw.shape[2], -1) for p in (0, 1)]
        if kind is LayoutKind.MLA:
            return [raw[:, 0] if raw.dim() == 4 else raw]  # vLLM's [blocks, 1, bs, dim] views
        # vllm_cpu: whole blocks as one opaque plane of [num_blocks, 1, block_bytes]
        return [raw.reshape(raw.shape[0], 1, -1)]

    def _blocks(self, start: int, end: int) -> tuple[torch.Tensor, int, int]:
        first, last, lo, hi = block_range(self.layout.block_size, start, end, len(self.block_table))
        return self.block_table[first:last].to(self.device), lo, hi

    def read_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        for chunk in chunks:
            check_chunk(self.layout, chunk)
            out = torch.frombuffer(chunk.buffer, dtype=torch.uint8)
            blocks, lo, hi = self._blocks(chunk.start, chunk.end)
            per_layer = out.numel() // self.layout.num_layers
            for i, layer in enumerate(self.layers):
                planes = self._planes(layer)
                per_plane = per_layer // len(planes)
                for p, pv in enumerate(planes):
                    sel = pv.index_select(0, blocks)
                    if self.layout.kind is not LayoutKind.VLLM_CPU:
                        sel = sel.reshape(sel.shape[0] * sel.shape[1], -1)[lo:hi]
                    dst = out[i * per_layer + p * per_plane : i * per_layer + (p + 1) * per_plane]
                    dst.copy_(sel.reshape(-1))

    def write_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        bs = self.layout.block_size
        for chunk in chunks:
            check_chunk(self.layout, chunk)
            w_lo, w_hi = chunk.write_range
            if w_lo >= w_hi:
                continue
            src = torch.frombuffer(chunk.buffer, dtype=torch.uint8)
            # Only the blocks up to the write range: a chunk may reach past the request's.
            blocks, lo, _ = self._blocks(chunk.start, w_hi)
            first, last = lo + w_lo - chunk.start, lo + w_hi - chunk.start
            per_layer = src.numel() // self.layout.num_layers
            for i, layer in enumerate(self.layers):
                planes = self._planes(layer)
                per_plane = per_layer // len(planes)
                for p, pv in enumerate(planes):
                    part = src[i * per_layer + p * per_plane : i * per_layer + (p + 1) * per_plane]
                    if self.layout.kind is LayoutKind.VLLM_CPU:
                        b0, b1 = (first - lo) // bs, -(-(last - lo) // bs)
                        data = part.reshape(chunk.num_tokens // bs, 1, -1)[b0:b1].to(self.device)
                        pv.index_copy_(0, blocks[b0:b1], data)
                        continue
                    rows = part.reshape(chunk.num_tokens, *pv.shape[2:])[first - lo : last - lo]
                    # Token positions inside the selected blocks -> (block, row) pairs.
                    pos = torch.arange(first, last, device=self.device)
                    pv[blocks[pos // bs], pos % bs] = rows.to(self.device)


class TorchTokenPlanesKV:
    """Reference for token-indexed layouts (SGLang): per layer, separate K and V buffers.

    ``planes`` are the buffers in chunk order (layer 0 K, layer 0 V, layer 1 K,
    ...), each ``[slots, heads, head_size]``; a request's pages are
    ``page_table`` and token ``t`` lives in slot
    ``page_table[t // page_size] * page_size + t % page_size``.
    """

    def __init__(
        self, layout: KVLayout, planes: Sequence[torch.Tensor], page_table: Sequence[int]
    ) -> None:
        expect = layout.num_layers * layout.kv_planes
        if len(planes) != expect:
            raise LayoutError(f"expected {expect} K/V buffers, got {len(planes)}")
        self.layout = layout
        self.planes = [p.reshape(p.shape[0], -1).view(torch.uint8) for p in planes]
        self.device = planes[0].device
        ps = layout.block_size
        slots = self.planes[0].shape[0]
        self.page_table = [int(x) for x in page_table]
        if self.page_table and (
            min(self.page_table) < 0 or (max(self.page_table) + 1) * ps > slots
        ):
            raise LayoutError(f"page table refers to slots outside [0, {slots})")

    def _slots(self, lo: int, hi: int) -> torch.Tensor:
        ps = self.layout.block_size
        if -(-hi // ps) > len(self.page_table):
            raise LayoutError(f"tokens up to {hi} need more pages than the table has")
        t = torch.arange(lo, hi)
        pages = torch.as_tensor(self.page_table, dtype=torch.long)[t // ps]
        return (pages * ps + t % ps).to(self.device)

    def read_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        for chunk in chunks:
            check_chunk(self.layout, chunk)
            out = torch.frombuffer(chunk.buffer, dtype=torch.uint8)
            slots = self._slots(chunk.start, chunk.end)
            per_plane = out.numel() // len(self.planes)
            for i, plane in enumerate(self.planes):
                dst = out[i * per_plane : (i + 1) * per_plane]
                dst.copy_(plane.index_select(0, slots).reshape(-1))

    def write_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        for chunk in chunks:
            check_chunk(self.layout, chunk)
            lo, hi = chunk.write_range
            if lo >= hi:
                continue
            src = torch.frombuffer(chunk.buffer, dtype=torch.uint8)
            slots = self._slots(lo, hi)
            per_plane = src.numel() // len(self.planes)
            for i, plane in enumerate(self.planes):
                rows = src[i * per_plane : (i + 1) * per_plane].reshape(chunk.num_tokens, -1)
                plane.index_copy_(
                    0, slots, rows[lo - chunk.start : hi - chunk.start].to(self.device)
                )
