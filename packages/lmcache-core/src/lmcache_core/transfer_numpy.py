"""A numpy implementation of the transfer protocol: the CPU reference.

It serves tests, benchmarks and engines whose KV lives in host memory that
numpy can view. ``torch`` tensors on the CPU can be wrapped with
``tensor.view(torch.uint8).numpy()`` by an adapter; core never imports torch.

Supported layouts (per layer):

* ``vllm_flash``: ``[2, num_blocks, block_size, heads, head_size]``
* ``vllm_flash_blocks_first``: ``[num_blocks, 2, block_size, heads, head_size]``
* ``vllm_cpu``: ``[num_blocks, heads, block_size, 2*head_size]`` (whole blocks, opaque)
* ``mla``: ``[num_blocks, block_size, head_size]``

Each request carries its block table: block ``i`` of the request holds
tokens ``[i*block_size, (i+1)*block_size)``.

Copies are split by layer over a few threads: numpy releases the GIL while it
copies, and block-sized copies cannot use the non-temporal stores that make
one large memcpy fast, so a single thread reaches only about 0.6 of memcpy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from lmcache_core.errors import LayoutError
from lmcache_core.layout import KVLayout, LayoutKind
from lmcache_core.transfer import ChunkIO, block_range, check_chunk

logger = logging.getLogger(__name__)

_POOL: ThreadPoolExecutor | None = None


def _executor(threads: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers < threads:  # type: ignore[attr-defined]
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lmcache-copy")
    return _POOL


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def layer_shape(layout: KVLayout, num_blocks: int) -> tuple[int, ...]:
    """Shape, in elements, of one layer's KV tensor for ``layout``."""
    bs, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    kind = layout.kind
    if kind is LayoutKind.VLLM_FLASH:
        return (2, num_blocks, bs, h, d)
    if kind is LayoutKind.VLLM_FLASH_BLOCKS_FIRST:
        return (num_blocks, 2, bs, h, d)
    if kind is LayoutKind.VLLM_CPU:
        return (num_blocks, h, bs, 2 * d)
    if kind is LayoutKind.MLA:
        return (num_blocks, bs, d)
    raise LayoutError(f"the numpy transfer does not handle layout {kind.value!r}")


class NumpyPagedKV:
    """Reader and writer over per-layer numpy arrays (any dtype; moved as bytes)."""

    def __init__(
        self,
        layout: KVLayout,
        layers: Sequence[np.ndarray],
        block_table: Sequence[int],
        *,
        threads: int | None = None,
    ):
        self.threads = default_threads() if threads is None else max(1, threads)
        if len(layers) != layout.num_layers:
            raise LayoutError(f"expected {layout.num_layers} layer arrays, got {len(layers)}")
        self.layout = layout
        self.block_table = np.asarray(block_table, dtype=np.int64)
        self._layers: list[np.ndarray] = []
        for i, arr in enumerate(layers):
            if not arr.flags.c_contiguous:
                raise LayoutError(f"layer {i} array must be C-contiguous")
            if arr.dtype.itemsize != layout.element_size:
                raise LayoutError(
                    f"layer {i} has {arr.dtype.itemsize}-byte elements, layout says "
                    f"{layout.element_size} ({layout.dtype})"
                )
            num_blocks = arr.shape[0] if layout.kind is not LayoutKind.VLLM_FLASH else arr.shape[1]
            if arr.shape != layer_shape(layout, num_blocks):
                raise LayoutError(
                    f"layer {i} has shape {arr.shape}, expected "
                    f"{layer_shape(layout, num_blocks)} for {layout.kind.value}"
                )
            if self.block_table.size and (
                self.block_table.min() < 0 or self.block_table.max() >= num_blocks
            ):
                raise LayoutError(f"block table refers to blocks outside [0, {num_blocks})")
            # Work on raw bytes so fp8/bf16 need no numpy dtype.
            self._layers.append(arr.view(np.uint8).reshape(arr.shape[:-1] + (-1,)))

    # ------------------------------------------------------------------ helpers

    def _blocks(self, start: int, end: int) -> tuple[np.ndarray, int, int]:
        """Block ids covering tokens [start, end), and the token offsets inside them."""
        first, last, lo, hi = block_range(self.layout.block_size, start, end, len(self.block_table))
        return self.block_table[first:last], lo, hi

    def _plane_views(self, layer: np.ndarray) -> list[np.ndarray]:
        """Views ``[num_blocks, block_size, row_bytes]`` of each K/V plane of a layer."""
        kind = self.layout.kind
        if kind is LayoutKind.VLLM_FLASH:
            return [layer[p].reshape(layer.shape[1], layer.shape[2], -1) for p in (0, 1)]
        if kind is LayoutKind.VLLM_FLASH_BLOCKS_FIRST:
            return [layer[:, p].reshape(layer.shape[0], layer.shape[2], -1) for p in (0, 1)]
        if kind is LayoutKind.MLA:
            return [layer]
        raise AssertionError(kind)

    def _check(self, chunk: ChunkIO) -> None:
        check_chunk(self.layout, chunk)

    # ------------------------------------------------------------------ protocol

    def _run_per_layer(self, fn: Callable[[int, np.ndarray], None]) -> None:
        if self.threads == 1 or len(self._layers) == 1:
            for i, layer in enumerate(self._layers):
                fn(i, layer)
            return
        ex = _executor(self.threads)
        n = self.threads

        def part(k: int) -> None:
            for i in range(k, len(self._layers), n):
                fn(i, self._layers[i])

        for f in [ex.submit(part, k) for k in range(n)]:
            f.result()

    def read_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        bs = self.layout.block_size
        plan = []
        for chunk in chunks:
            self._check(chunk)
            out = np.frombuffer(chunk.buffer, dtype=np.uint8)
            blocks, lo, hi = self._blocks(chunk.start, chunk.end)
            plan.append((out, blocks, lo, hi, out.size // self.layout.num_layers))

        def layer_fn(i: int, layer: np.ndarray) -> None:
            for out, blocks, lo, hi, per_layer in plan:
                dst_layer = out[i * per_layer : (i + 1) * per_layer]
                if self.layout.kind is LayoutKind.VLLM_CPU:
                    dst = dst_layer.reshape((len(blocks), *layer.shape[1:]))
                    np.take(layer, blocks, axis=0, out=dst, mode="wrap")
                    continue
                planes = self._plane_views(layer)
                per_plane = per_layer // len(planes)
                for p, pv in enumerate(planes):
                    dst = dst_layer[p * per_plane : (p + 1) * per_plane]
                    if lo == 0 and hi == len(blocks) * bs:
                        # mode="wrap": indices were checked; "raise" would buffer the copy.
                        np.take(
                            pv, blocks, axis=0, out=dst.reshape(len(blocks), bs, -1), mode="wrap"
                        )
                    else:
                        dst.reshape(hi - lo, -1)[...] = pv[blocks].reshape(-1, pv.shape[-1])[lo:hi]

        self._run_per_layer(layer_fn)

    def write_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        bs = self.layout.block_size
        plan = []
        for chunk in chunks:
            self._check(chunk)
            lo_tok, hi_tok = chunk.write_range
            if lo_tok >= hi_tok:
                continue
            src = np.frombuffer(chunk.buffer, dtype=np.uint8)
            # Only the blocks up to the write range: a chunk may reach past the request's.
            blocks, lo, _ = self._blocks(chunk.start, hi_tok)
            plan.append(
                (
                    src,
                    blocks,
                    lo,
                    chunk.num_tokens,
                    lo + lo_tok - chunk.start,
                    lo + hi_tok - chunk.start,
                    src.size // self.layout.num_layers,
                )
            )

        def layer_fn(i: int, layer: np.ndarray) -> None:
            for src, blocks, lo, ntok, first, last, per_layer in plan:
                src_layer = src[i * per_layer : (i + 1) * per_layer]
                if self.layout.kind is LayoutKind.VLLM_CPU:
                    b0, b1 = (first - lo) // bs, -(-(last - lo) // bs)
                    s = src_layer.reshape((ntok // bs, *layer.shape[1:]))
                    layer[blocks[b0:b1]] = s[b0:b1]
                    continue
                planes = self._plane_views(layer)
                per_plane = per_layer // len(planes)
                for p, pv in enumerate(planes):
                    rows = src_layer[p * per_plane : (p + 1) * per_plane].reshape(ntok, -1)
                    _scatter_rows(pv, blocks, bs, lo, first, last, rows)

        if plan:
            self._run_per_layer(layer_fn)


def _scatter_rows(
    pv: np.ndarray, blocks: np.ndarray, bs: int, lo: int, first: int, hi: int, rows: np.ndarray
) -> None:
    """Write ``rows`` (tokens lo..hi of the selected blocks) for positions [first, hi)."""
    pos = first
    # Head: a partial block.
    if pos < hi and pos % bs:
        b, r = divmod(pos, bs)
        n = min(bs - r, hi - pos)
        pv[blocks[b], r : r + n] = rows[pos - lo : pos - lo + n]
        pos += n
    # Middle: whole blocks, one fancy-index scatter.
    full = (hi - pos) // bs
    if full:
        b = pos // bs
        pv[blocks[b : b + full]] = rows[pos - lo : pos - lo + full * bs].reshape(full, bs, -1)
        pos += full * bs
    # Tail: a partial block.
    if pos < hi:
        b = pos // bs
        pv[blocks[b], : hi - pos] = rows[pos - lo : hi - lo]


def host_transfer(
    layout: KVLayout, layers: Sequence[np.ndarray], block_table: Sequence[int]
) -> Any:
    """The fastest installed reader/writer for KV in host memory.

    lmcache-cuda's C kernels when installed (found through the
    ``lmcache.transfers`` entry points, so core imports no sibling), else
    this module's numpy implementation.
    """
    from lmcache_core.plugins import TRANSFERS, installed_names, load_plugin

    if "c" in installed_names(TRANSFERS):
        try:
            return load_plugin(TRANSFERS, "c")(layout, layers, block_table)
        except Exception as e:  # a broken or unbuilt plugin: the reference still works
            logger.warning("C transfer kernels unusable (%s); using numpy", e)
    return NumpyPagedKV(layout, layers, block_table)
