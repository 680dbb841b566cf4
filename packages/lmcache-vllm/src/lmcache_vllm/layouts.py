"""Recognise vLLM's KV cache tensors as an lmcache :class:`~lmcache_core.layout.KVLayout`."""

from __future__ import annotations

import re
from typing import Any

import torch
from lmcache_core.errors import LayoutError
from lmcache_core.layout import KVLayout, LayoutKind
from lmcache_cuda.torch_dtypes import TORCH_DTYPES

#: Integer dtype of each element size: KV is moved as opaque integers.
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def ordered_layers(kv_caches: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Layers in model order (by the numbers in their names), the same on every rank."""
    return sorted(kv_caches.items(), key=lambda item: _natural_key(item[0]))


def detect_layout(
    kv_caches: dict[str, torch.Tensor], *, block_size: int, num_kv_heads: int, head_size: int
) -> KVLayout:
    """The layout of vLLM's per-layer KV tensors, checked against the model's shape."""
    if not kv_caches:
        raise LayoutError("vLLM registered no KV cache tensors")
    layers = ordered_layers(kv_caches)
    name, first = layers[0]
    shape = tuple(first.shape)
    for other_name, t in layers[1:]:
        if tuple(t.shape) != shape or t.dtype != first.dtype:
            raise LayoutError(
                f"layers {name} and {other_name} differ in shape or dtype "
                f"({shape}/{first.dtype} vs {tuple(t.shape)}/{t.dtype}); hybrid models are not "
                "supported yet"
            )
    if first.dtype not in TORCH_DTYPES:
        raise LayoutError(f"KV dtype {first.dtype} is not supported")
    bs, h, d = block_size, num_kv_heads, head_size
    on_cpu = first.device.type == "cpu"
    if len(shape) == 4 and shape[1:] == (h, bs, 2 * d) and on_cpu and first.is_contiguous():
        # vLLM's CPU backend: blocks packed for the matrix units, copied whole.
        kind = LayoutKind.VLLM_CPU
    elif len(shape) == 4 and h == 1 and shape[1:] == (1, bs, d):
        kind = LayoutKind.MLA  # vLLM's view of a latent cache: [blocks, 1, bs, dim]
    elif len(shape) == 4 and shape[1:] == (h, bs, 2 * d):
        # vLLM's per-layer view on GPUs, with the strides of VLLM_KV_CACHE_LAYOUT.
        kind = LayoutKind.VLLM_BHNC
        if first.stride(-1) != 1:
            raise LayoutError(
                f"KV cache of {name} has strides {tuple(first.stride())}; lmcache needs each "
                "head's K|V dense (the last stride 1)"
            )
    elif len(shape) == 5 and shape[0] == 2 and shape[2:] == (bs, h, d):
        kind = LayoutKind.VLLM_FLASH
    elif len(shape) == 5 and shape[1] == 2 and shape[2:] == (bs, h, d):
        kind = LayoutKind.VLLM_FLASH_BLOCKS_FIRST
    elif len(shape) == 3 and shape[1] == bs and h == 1:
        kind = LayoutKind.MLA
        d = shape[2]
    else:
        raise LayoutError(
            f"unsupported vLLM KV cache shape {shape} for block_size={bs}, "
            f"num_kv_heads={h}, head_size={d}; supported per-layer layouts: "
            "[num_blocks, heads, block_size, 2*head_size] (vLLM's views, any strides with the "
            "last dimension dense; contiguous on the CPU backend), "
            "[2, num_blocks, block_size, heads, head_size] and "
            "[num_blocks, 2, block_size, heads, head_size] (flash), "
            "[num_blocks, block_size, head_size] and [num_blocks, 1, block_size, head_size] "
            "(MLA, any strides)"
        )
    for lname, t in layers:
        if kind not in (LayoutKind.VLLM_BHNC, LayoutKind.MLA) and not t.is_contiguous():
            raise LayoutError(
                f"KV cache of {lname} is not contiguous; lmcache reads this shape only when it "
                "is (or as [num_blocks, heads, block_size, 2*head_size] with any strides)"
            )
    return KVLayout(
        kind=kind,
        dtype=TORCH_DTYPES[first.dtype],
        num_layers=len(layers),
        num_kv_heads=h,
        head_size=d,
        block_size=bs,
    )
