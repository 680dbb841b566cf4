"""Every KV cache layout vLLM can choose, as vLLM itself builds the views.

vLLM hands a connector one ``[blocks, heads, block_size, K|V]`` view per layer
whose strides follow ``VLLM_KV_CACHE_LAYOUT`` (six memory orders); on GPUs
these views are usually not contiguous. The views here come from vLLM's own
``create_kv_cache_views`` over one byte buffer, as its GPU worker makes them
(on the CPU device, so the C kernels do the copies that CUDA does on a GPU).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from lmcache_core.config import CacheConfig  # noqa: E402
from lmcache_core.engine import CacheEngine  # noqa: E402
from lmcache_core.layout import LayoutKind  # noqa: E402
from lmcache_cuda import paged_memory  # noqa: E402
from lmcache_cuda.paged import CPagedKV  # noqa: E402
from lmcache_vllm.layouts import detect_layout, ordered_layers  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheTensor,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

HEADS, HEAD, BLOCK, LAYERS, BLOCKS = 2, 8, 16, 3, 12


def vllm_views(layout: KVCacheLayout, seed: int | None) -> dict[str, torch.Tensor]:
    """The per-layer views vLLM's worker registers with a connector, for ``layout``."""
    spec = FullAttentionSpec(
        block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.bfloat16
    )
    layer_stride, block_stride, *_ = compute_layout_strides(spec, BLOCKS, LAYERS, layout)
    size = spec.page_size_bytes * BLOCKS * LAYERS
    raw = torch.zeros(size, dtype=torch.int8)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        raw.copy_(torch.randint(-128, 127, (size,), dtype=torch.int8, generator=g))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    tensor = KVCacheTensor(
        size=size, layers=names, layer_stride=layer_stride, block_stride=block_stride
    )
    return dict(zip(names, create_kv_cache_views(raw, spec, BLOCKS, layout, tensor)))


def token_kv(views: dict[str, torch.Tensor], table: list[int], t: int) -> list[torch.Tensor]:
    """Token ``t``'s K and V in every layer (as integers: random bits hold NaNs)."""
    block, pos = table[t // BLOCK], t % BLOCK
    return [v[block, :, pos, :].view(torch.int16).clone() for _, v in ordered_layers(views)]


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda x: x.name)
def test_every_layout_is_recognised_and_gathered_token_by_token(layout):
    views = vllm_views(layout, seed=1)
    lay = detect_layout(views, block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD)
    contiguous = layout is KVCacheLayout.LBHNC  # what vLLM's CPU backend uses
    assert lay.kind is (LayoutKind.VLLM_CPU if contiguous else LayoutKind.VLLM_BHNC)
    if contiguous:
        return  # whole-block copies: tested end to end with the CPU backend
    table = [7, 2, 9, 0]
    kv = paged_memory(lay, [t for _, t in ordered_layers(views)])(table)
    assert isinstance(kv, CPagedKV)
    from lmcache_core.transfer import ChunkIO

    lo, hi = 5, 50  # not block-aligned on either side
    buf = bytearray(lay.chunk_bytes(hi - lo))
    kv.read_chunks([ChunkIO(lo, hi, memoryview(buf))])
    chunk = torch.frombuffer(buf, dtype=torch.int16).view(LAYERS, 2, hi - lo, HEADS, HEAD)
    for t in range(lo, hi):
        for layer, kv_t in enumerate(token_kv(views, table, t)):
            assert torch.equal(chunk[layer, 0, t - lo], kv_t[:, :HEAD])  # K
            assert torch.equal(chunk[layer, 1, t - lo], kv_t[:, HEAD:])  # V


def test_kv_stored_from_one_layout_loads_into_another():
    """The chunk format is the same for every order: an NHD engine's cache serves an
    HND engine (and blocks-outermost ones), token for token."""
    config = CacheConfig.from_dict({"chunk_size": 32, "max_local_cpu_size": "4MiB"})
    tokens = list(range(500, 580))
    src = vllm_views(KVCacheLayout.LBNHC, seed=2)
    lay = detect_layout(src, block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD)
    engine = CacheEngine(config, model="m", layout=lay)
    try:
        table_a = [3, 8, 1, 10, 5]
        assert engine.store(tokens, paged_memory(lay, [t for _, t in ordered_layers(src)])(
            table_a
        )) == len(tokens)  # fmt: skip
        for target in (KVCacheLayout.LHBNC, KVCacheLayout.BLHNC, KVCacheLayout.BHLNC):
            dst = vllm_views(target, seed=None)
            lay_b = detect_layout(dst, block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD)
            assert lay_b.fingerprint() == lay.fingerprint()  # same chunk bytes, same keys
            table_b = [11, 0, 6, 2, 9]
            kv_b = paged_memory(lay_b, [t for _, t in ordered_layers(dst)])(table_b)
            got = engine.retrieve(tokens, kv_b)
            assert got == len(tokens)
            for t in range(got):
                for a, b in zip(token_kv(src, table_a, t), token_kv(dst, table_b, t)):
                    assert torch.equal(a, b)
            untouched = [b for b in range(BLOCKS) if b not in table_b]
            for _, v in ordered_layers(dst):
                assert not bool(v[untouched].view(torch.int16).any())
    finally:
        engine.close()


def test_blending_reads_k_and_v_from_strided_views():
    from lmcache_vllm.blend.paged import PagedKV

    views = vllm_views(KVCacheLayout.BLNHC, seed=3)
    lay = detect_layout(views, block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD)
    layers = [t for _, t in ordered_layers(views)]
    paged = PagedKV(lay, layers, [None] * LAYERS)
    table = [4, 0, 11]
    k, v = paged.read(2, table, 7, 40)
    assert k.shape == v.shape == (33, HEADS, HEAD)
    for t in range(7, 40):
        kv_t = token_kv(views, table, t)[2]
        assert torch.equal(k[t - 7].view(torch.int16), kv_t[:, :HEAD])
        assert torch.equal(v[t - 7].view(torch.int16), kv_t[:, HEAD:])


def test_lmcache_cuda_knows_every_order_vllm_has():
    """Benchmarks and kernel tests build vLLM's views from lmcache_cuda.strided."""
    from lmcache_cuda.strided import ORDERS

    assert {layout.name: layout.value for layout in KVCacheLayout} == ORDERS


@pytest.mark.parametrize("layout", [KVCacheLayout.LBHNC, KVCacheLayout.BLHNC], ids=lambda x: x.name)
def test_mla_latent_views_are_recognised_and_gathered(layout):
    """DeepSeek-style MLA: vLLM views each layer's latent cache as [blocks, 1, bs, dim]."""
    from lmcache_core.transfer import ChunkIO
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    dim = 24
    spec = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=dim, dtype=torch.bfloat16)
    layer_stride, block_stride, *_ = compute_layout_strides(spec, BLOCKS, LAYERS, layout)
    size = spec.page_size_bytes * BLOCKS * LAYERS
    g = torch.Generator().manual_seed(5)
    raw = torch.randint(-128, 127, (size,), dtype=torch.int8, generator=g)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    tensor = KVCacheTensor(size=size, layers=names, layer_stride=layer_stride,
                           block_stride=block_stride)  # fmt: skip
    views = dict(zip(names, create_kv_cache_views(raw, spec, BLOCKS, layout, tensor)))
    assert tuple(views[names[0]].shape) == (BLOCKS, 1, BLOCK, dim)
    lay = detect_layout(views, block_size=BLOCK, num_kv_heads=1, head_size=dim)
    assert lay.kind is LayoutKind.MLA
    table = [3, 0, 8]
    kv = paged_memory(lay, [t for _, t in ordered_layers(views)])(table)
    lo, hi = 3, 40
    buf = bytearray(lay.chunk_bytes(hi - lo))
    kv.read_chunks([ChunkIO(lo, hi, memoryview(buf))])
    chunk = torch.frombuffer(buf, dtype=torch.int16).view(LAYERS, hi - lo, dim)
    for layer, (_, v) in enumerate(ordered_layers(views)):
        for t in range(lo, hi):
            want = v[table[t // BLOCK], 0, t % BLOCK].view(torch.int16)
            assert torch.equal(chunk[layer, t - lo], want)
