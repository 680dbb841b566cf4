"""vLLM's strided KV views (``vllm_bhnc``): every memory order vLLM can choose.

Since its KV cache layouts, vLLM gives a connector one ``[blocks, heads,
block_size, K|V]`` view per layer whose strides follow the layout in use
(``VLLM_KV_CACHE_LAYOUT``: NHD or HND inside a block, layers or blocks
outermost), so the views are usually not contiguous. Here each of the six
orders is built the way vLLM builds it (one byte buffer for all layers,
strided by the permutation), and the C kernels, the torch reference and (on
a GPU) the CUDA kernels are checked against an oracle that reads tokens
straight from the logical view.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmcache_core.errors import LayoutError
from lmcache_core.layout import KVLayout
from lmcache_core.transfer import ChunkIO
from lmcache_cuda import _ffi, paged_memory
from lmcache_cuda.paged import CPagedKV, CPagedMemory, layer_planes
from lmcache_cuda.strided import ORDERS, strided_layers

torch = pytest.importorskip("torch")
from lmcache_cuda.reference import TorchPagedKV  # noqa: E402


def strided_views(layout: KVLayout, nb: int, order, device="cpu", fill=True, seed=0):
    views, buf = strided_layers(layout, nb, order, device=device, fill=fill, seed=seed)
    assert tuple(views[0].shape) == (
        nb, layout.num_kv_heads, layout.block_size, 2 * layout.head_size
    )  # fmt: skip
    return views, buf


def oracle_chunk(layout: KVLayout, views, table, start: int, end: int) -> bytes:
    """The neutral-v1 chunk of tokens [start, end), read token by token from the views."""
    bs, d = layout.block_size, layout.head_size
    parts = []
    for v in views:
        for plane in (slice(0, d), slice(d, 2 * d)):
            for t in range(start, end):
                block, pos = table[t // bs], t % bs
                parts.append(v[block, :, pos, plane].cpu().contiguous().numpy().tobytes())
    return b"".join(parts)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    order=st.sampled_from(sorted(ORDERS)),
    nl=st.integers(1, 3),
    heads=st.integers(1, 4),
    hs=st.sampled_from([1, 3, 8, 64]),
    bs=st.sampled_from([1, 4, 16]),
    dtype=st.sampled_from(["bfloat16", "float32", "float8_e4m3fn"]),
    data=st.data(),
)
def test_c_kernels_and_torch_reference_match_the_oracle(order, nl, heads, hs, bs, dtype, data):
    layout = KVLayout("vllm_bhnc", dtype, nl, heads, hs, bs)
    nb = data.draw(st.integers(2, 9))
    n_req = data.draw(st.integers(1, nb))
    table = data.draw(st.permutations(range(nb)))[:n_req]
    start = data.draw(st.integers(0, n_req * bs - 1))
    end = data.draw(st.integers(start + 1, n_req * bs))
    views, _ = strided_views(layout, nb, order, seed=data.draw(st.integers(0, 99)))
    expect = oracle_chunk(layout, views, table, start, end)
    assert len(expect) == layout.chunk_bytes(end - start)

    got_c, got_t = bytearray(len(expect)), bytearray(len(expect))
    kv_c = paged_memory(layout, views)(table)
    assert isinstance(kv_c, CPagedKV)  # the C kernels, not the fallback
    kv_c.read_chunks([ChunkIO(start, end, memoryview(got_c))])
    TorchPagedKV(layout, views, table).read_chunks([ChunkIO(start, end, memoryview(got_t))])
    assert bytes(got_c) == expect
    assert bytes(got_t) == expect

    # Scatter a sub-range into an empty cache laid out the same way: exactly those
    # tokens' K and V land, nothing else is touched.
    w_from = data.draw(st.integers(start, end))
    io = ChunkIO(start, end, memoryview(bytearray(expect)), w_from, end)
    dst_c, raw_c = strided_views(layout, nb, order, fill=False)
    dst_t, raw_t = strided_views(layout, nb, order, fill=False)
    paged_memory(layout, dst_c)(table).write_chunks([io])
    TorchPagedKV(layout, dst_t, table).write_chunks([io])
    assert torch.equal(raw_c, raw_t)
    written = oracle_chunk(layout, dst_c, table, w_from, end)
    assert written == oracle_chunk(layout, views, table, w_from, end)
    untouched = sum(int(v.count_nonzero()) for v in dst_c) * layout.element_size
    assert untouched == len(written)  # sources are never 0: every non-zero was written


def test_the_planes_follow_the_strides():
    layout = KVLayout("vllm_bhnc", "bfloat16", 2, 4, 64, 16)
    views, _ = strided_views(layout, 8, "LBNHC")  # NHD: heads adjacent
    p = layer_planes(layout, views)
    es = 2
    assert p.row_segments == 4 and p.row_bytes == 4 * 64 * es
    assert p.segment_stride == 2 * 64 * es  # a head's K, its V, the next head's K
    assert p.row_stride == 4 * 2 * 64 * es and p.block_stride == 16 * p.row_stride
    assert p.bases[1] - p.bases[0] == 64 * es  # V right after K
    views, _ = strided_views(layout, 8, "BHLNC")  # blocks, then heads, outermost
    p = layer_planes(layout, views)
    assert p.segment_stride == 2 * 16 * 2 * 64 * es  # heads hold every layer's tokens
    assert p.block_stride == 4 * p.segment_stride


def test_strided_views_that_cannot_be_copied_are_refused_clearly():
    layout = KVLayout("vllm_bhnc", "bfloat16", 2, 2, 8, 4)
    views, _ = strided_views(layout, 4, "LBNHC")
    with pytest.raises(LayoutError, match="one layout for every layer"):
        layer_planes(layout, [views[0], views[1].contiguous()])
    torn = torch.zeros((4, 2, 4, 32), dtype=torch.bfloat16)[..., ::2]  # K|V not dense
    with pytest.raises(LayoutError, match="dense"):
        layer_planes(layout, [torn, torn])


def test_the_c_abi_refuses_overlapping_row_runs():
    layout = KVLayout("vllm_bhnc", "bfloat16", 1, 2, 8, 4)
    views, _ = strided_views(layout, 4, "LBNHC")
    mem = CPagedMemory(layout, views)
    lib, ffi = mem.lib, _ffi.ffi()
    table = np.array([0, 1], dtype=np.int64)
    out = bytearray(layout.chunk_bytes(8))
    for segs, stride in ((3, 32), (2, 8)):  # 32 bytes not in 3 runs; runs of 16 bytes 8 apart
        mem.desc.row_segments, mem.desc.segment_stride = segs, stride
        rc = lib.lmc_cpu_gather(
            mem.desc, ffi.cast("int64_t *", table.ctypes.data), 2, 0, 8,
            ffi.from_buffer(out), 0, 8, 1,
        )  # fmt: skip
        assert rc == lib.LMC_EINVAL
    assert out == bytearray(len(out))


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    order=st.sampled_from(sorted(ORDERS)),
    heads=st.sampled_from([1, 2, 8]),
    hs=st.sampled_from([64, 128, 6]),
    dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
    cuts=st.lists(st.integers(1, 300), min_size=1, max_size=3, unique=True),
    first=st.integers(0, 2),
    write_from=st.integers(0, 150),
)
def test_cuda_kernels_match_the_oracle_on_every_order(
    order, heads, hs, dtype, cuts, first, write_from
):
    from lmcache_core.pool import SLOT_OFFSET, SlotPool
    from lmcache_cuda.cuda import CudaPagedMemory
    from lmcache_cuda.pinned import PinnedArena

    bs, nb = 16, 48
    layout = KVLayout("vllm_bhnc", dtype, 2, heads, hs, bs)
    bounds = sorted({first * bs, *(first * bs + c for c in cuts)})
    nblocks = -(-bounds[-1] // bs)
    table = torch.randperm(nb, generator=torch.Generator().manual_seed(nblocks))[:nblocks].tolist()
    views, _ = strided_views(layout, nb, order, device="cuda", seed=len(cuts))
    spans = list(itertools.pairwise(bounds))
    sizes = [layout.chunk_bytes(hi - lo) for lo, hi in spans]
    pool = SlotPool(PinnedArena(len(sizes) * max(sizes) + SLOT_OFFSET + 4096), max(sizes))
    slots = [pool.allocate(None, 1, n) for n in sizes]  # type: ignore[arg-type]
    lib = _ffi.cuda_lib()
    before = lib.lmc_cuda_launch_count()
    CudaPagedMemory(layout, views).request(table).read_chunks(
        [ChunkIO(lo, hi, s.view[:n]) for (lo, hi), s, n in zip(spans, slots, sizes)]
    )
    assert lib.lmc_cuda_launch_count() - before == len(spans), "the kernel path did not run"
    for (lo, hi), s, n in zip(spans, slots, sizes):
        assert bytes(s.view[:n]) == oracle_chunk(layout, views, table, lo, hi)
    dst, _ = strided_views(layout, nb, order, device="cuda", fill=False)
    CudaPagedMemory(layout, dst).request(table).write_chunks(
        [ChunkIO(lo, hi, s.view[:n], write_from) for (lo, hi), s, n in zip(spans, slots, sizes)]
    )
    torch.cuda.synchronize()
    for lo, hi in spans:
        w = max(lo, write_from)
        if w < hi:
            assert oracle_chunk(layout, dst, table, w, hi) == oracle_chunk(
                layout, views, table, w, hi
            )
    pool.close()
