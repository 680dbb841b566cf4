"""vLLM's KV memory orders, to build the strided views it hands a connector.

Since its KV cache layouts, vLLM allocates one byte buffer for all layers and
views it per layer as ``[blocks, heads, block_size, K|V]`` (lmcache's
``vllm_bhnc``) with strides that follow ``VLLM_KV_CACHE_LAYOUT``: the
physical order of the logical axes ``[layer, block, head, token, K|V]``.
LBNHC (NHD inside a block, layers outermost) is its default on GPUs. The
benchmarks and tests build the same views from here without vLLM installed.
"""

from __future__ import annotations

from typing import Any

from lmcache_core.layout import KVLayout

#: Physical order of the logical axes [L, B, H, N, C], as vLLM's KVCacheLayout values.
ORDERS: dict[str, tuple[int, ...]] = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}


def strided_layers(
    layout: KVLayout,
    num_blocks: int,
    order: str = "LBNHC",
    *,
    device: str = "cpu",
    fill: bool = True,
    seed: int = 0,
) -> tuple[list[Any], Any]:
    """Per-layer views of one buffer laid out in ``order``, and the buffer.

    Filled with random non-zero integers of the element size (so a zero read
    back is a byte never copied), or zeros.
    """
    import torch

    shape = (layout.num_layers, num_blocks, layout.num_kv_heads, layout.block_size,
             2 * layout.head_size)  # fmt: skip
    perm = ORDERS[order]
    physical = tuple(shape[i] for i in perm)
    int_t = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[layout.element_size]
    if fill:
        g = torch.Generator(device=device).manual_seed(seed)
        hi = 255 if layout.element_size == 1 else 2**15 - 1
        buf = torch.randint(1, hi, physical, dtype=int_t, device=device, generator=g)
    else:
        buf = torch.zeros(physical, dtype=int_t, device=device)
    logical = buf.permute(*[perm.index(i) for i in range(5)])
    return [logical[i] for i in range(layout.num_layers)], buf
