"""The CUDA kernels against the torch reference, over the shapes real engines produce.

Several chunks per call, chunks that start after token 0, partial write ranges,
rows of every word width (16, 8, 4 and 1 bytes: a 256-byte row is one KV head
at TP8, a 13-byte row forces bytes), plane bases that are not 16-byte aligned,
addresses past 2**31 bytes into a plane, work queued on a non-default stream,
and proof that the kernel path ran (the library's launch counter), not the
torch fallback. GPU tests are marked ``gpu``; the word-width choice and the
base alignment are host code, tested here on any machine with nvcc.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmcache_core.layout import KVLayout
from lmcache_core.pool import SLOT_OFFSET, SlotPool
from lmcache_core.transfer import ChunkIO
from lmcache_cuda import _ffi, build
from lmcache_cuda.cuda import base_alignment

# --------------------------------------------------------------- host side, any machine


def test_base_alignment_is_the_largest_power_of_two_dividing_every_base():
    assert base_alignment([0x7F0000000000]) == 256  # capped
    assert base_alignment([0x1000, 0x1010]) == 16
    assert base_alignment([0x1000, 0x1008, 0x2000]) == 8
    assert base_alignment([0x1000, 0x1002]) == 2
    assert base_alignment([0x1001]) == 1
    assert base_alignment([]) == 256


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory):
    if build.nvcc() is None:
        pytest.skip("nvcc is not installed")
    path = build.build_cuda(tmp_path_factory.mktemp("cuda"))
    return _ffi.ffi().dlopen(str(path))


@pytest.mark.parametrize(
    "row_bytes, strides, base_align, chunk, word",
    [
        (256, (4096, 256), 256, 0x10000, 16),  # one bf16 head of 128 at TP8
        (2048, (32768, 2048), 256, 0x10000, 16),  # Llama-3-8B: 8 heads x 128 x bf16
        (24, (384, 24), 256, 0x10000, 8),
        (12, (192, 12), 256, 0x10000, 4),
        (13, (208, 13), 256, 0x10000, 1),
        (256, (4096, 256), 8, 0x10000, 8),  # a view whose base is only 8-byte aligned
        (256, (4096, 256), 0, 0x10000, 1),  # alignment unknown: bytes, never a fault
        (256, (4096, 256), 256, 0x10004, 4),  # chunk address 4-byte aligned
    ],
)
def test_the_word_width_honours_every_address_and_size(
    cuda_lib, row_bytes, strides, base_align, chunk, word
):
    ffi = _ffi.ffi()
    desc = ffi.new(
        "lmc_paged *",
        {
            "num_planes": 2,
            "plane_base": ffi.NULL,
            "block_stride": strides[0],
            "row_stride": strides[1],
            "row_bytes": row_bytes,
            "rows_per_block": 16,
            "num_blocks": 8,
            "base_align": base_align,
        },
    )
    assert cuda_lib.lmc_cuda_word_bytes(desc, ffi.cast("void *", chunk)) == word


# --------------------------------------------------------------------------- GPU

_ROWS = [  # (dtype, heads, head_size): row bytes and the word the kernel uses
    ("bfloat16", 8, 128),  # 2048 B, 16
    ("bfloat16", 1, 128),  # 256 B, 16
    ("float32", 1, 6),  # 24 B, 8
    ("bfloat16", 1, 6),  # 12 B, 4
    ("float8_e4m3fn", 1, 13),  # 13 B, 1
    ("float16", 2, 64),  # 256 B, 16
]


def _int_tensor(layout: KVLayout, shape, generator, device="cuda"):
    import torch

    int_t = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[layout.element_size]
    hi = 255 if layout.element_size == 1 else 2**15 - 1
    return torch.randint(1, hi, shape, dtype=int_t, device=device, generator=generator)


def _pool(nbytes: int, slots: int) -> SlotPool:
    from lmcache_cuda.pinned import PinnedArena

    return SlotPool(PinnedArena(slots * nbytes + SLOT_OFFSET + 4096), nbytes)


@pytest.mark.gpu
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    row=st.sampled_from(_ROWS),
    kind=st.sampled_from(["vllm_flash", "vllm_flash_blocks_first"]),
    block_size=st.sampled_from([16, 32]),
    cuts=st.lists(st.integers(1, 400), min_size=1, max_size=4, unique=True),
    first=st.integers(0, 3),
    write_from=st.integers(0, 200),
    write_until=st.integers(0, 500),
    offset_base=st.booleans(),
    side_stream=st.booleans(),
)
def test_cuda_matches_the_torch_reference(
    row, kind, block_size, cuts, first, write_from, write_until, offset_base, side_stream
):
    import torch
    from lmcache_core.transfer_numpy import layer_shape
    from lmcache_cuda.cuda import CudaPagedMemory
    from lmcache_cuda.reference import TorchPagedKV

    dtype, heads, head_size = row
    layout = KVLayout(kind, dtype, 2, heads, head_size, block_size)
    nb = 64
    # Chunks [b0, b1), [b1, b2), ... starting after token 0 when first > 0.
    bounds = sorted({first * block_size, *(first * block_size + c for c in cuts)})
    ntok = bounds[-1]
    nblocks = -(-ntok // block_size)
    g = torch.Generator(device="cuda").manual_seed(len(cuts) * 7 + first)
    table = torch.randperm(nb, generator=torch.Generator().manual_seed(ntok))[:nblocks].tolist()
    if nblocks > nb:
        return
    shape = layer_shape(layout, nb)

    def layers_like(fill: bool):
        out = []
        for _ in range(layout.num_layers):
            if offset_base:  # a view one element in: a base that is not 16-byte aligned
                flat = torch.zeros(
                    int(np.prod(shape)) + 1, dtype=_int_tensor(layout, (1,), g).dtype, device="cuda"
                )
                t = flat[1:].view(shape)
            else:
                t = torch.zeros(shape, dtype=_int_tensor(layout, (1,), g).dtype, device="cuda")
            if fill:
                t.copy_(_int_tensor(layout, shape, g))
            out.append(t)
        return out

    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    lib = _ffi.cuda_lib()
    with torch.cuda.stream(stream):
        src = layers_like(True)  # queued on `stream`: the kernels must run after it
        chunks_bytes = [layout.chunk_bytes(hi - lo) for lo, hi in itertools.pairwise(bounds)]
        if not chunks_bytes:
            return
        pool = _pool(max(chunks_bytes), 2 * len(chunks_bytes))
        a = [pool.allocate(None, 1, n) for n in chunks_bytes]  # type: ignore[arg-type]
        b = [pool.allocate(None, 1, n) for n in chunks_bytes]  # type: ignore[arg-type]
        spans = list(itertools.pairwise(bounds))

        def ios(slots):
            return [
                ChunkIO(lo, hi, s.view[:n], write_from, write_until)
                for (lo, hi), s, n in zip(spans, slots, chunks_bytes)
            ]

        mem = CudaPagedMemory(layout, src)
        before = lib.lmc_cuda_launch_count()
        mem.request(table).read_chunks(ios(a))
        launched = lib.lmc_cuda_launch_count() - before
        TorchPagedKV(layout, src, table).read_chunks(ios(b))
        assert launched == len(chunks_bytes), "the kernel path did not run"
        for x, y in zip(a, b):
            assert bytes(x.view) == bytes(y.view)
        dst, ref = layers_like(False), layers_like(False)
        before = lib.lmc_cuda_launch_count()
        CudaPagedMemory(layout, dst).request(table).write_chunks(ios(a))
        expect = sum(1 for c in ios(a) if c.write_range[0] < c.write_range[1])
        assert lib.lmc_cuda_launch_count() - before == expect
        TorchPagedKV(layout, ref, table).write_chunks(ios(b))
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(dst, ref))
    pool.close()


@pytest.mark.gpu
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    row=st.sampled_from(_ROWS),
    kind=st.sampled_from(["vllm_flash", "vllm_flash_blocks_first"]),
    req_blocks=st.integers(1, 8),
    until=st.integers(1, 128),
)
def test_cuda_writes_a_chunk_reaching_past_the_table_up_to_its_write_range(
    row, kind, req_blocks, until
):
    """Hits inside a chunk: a longer stored chunk's first tokens go into a request whose
    blocks end before the chunk does (CPU twin: test_kernels.py)."""
    import torch
    from lmcache_core.transfer_numpy import layer_shape
    from lmcache_cuda.cuda import CudaPagedMemory
    from lmcache_cuda.reference import TorchPagedKV

    dtype, heads, head_size = row
    layout = KVLayout(kind, dtype, 2, heads, head_size, 16)
    nb, chunk_tokens = 24, 256
    until = min(until, req_blocks * 16)
    g = torch.Generator(device="cuda").manual_seed(until)
    shape = layer_shape(layout, nb)
    src = [_int_tensor(layout, shape, g) for _ in range(layout.num_layers)]
    whole = list(range(16))  # the chunk's own blocks when it was stored
    pool = _pool(layout.chunk_bytes(chunk_tokens), 1)
    slot = pool.allocate(None, chunk_tokens, layout.chunk_bytes(chunk_tokens))  # type: ignore[arg-type]
    assert slot is not None
    TorchPagedKV(layout, src, whole).read_chunks([ChunkIO(0, chunk_tokens, slot.view)])
    table = list(range(nb - req_blocks, nb))  # the request's blocks: fewer than the chunk's
    io = ChunkIO(0, chunk_tokens, slot.view, 0, until)
    dst = [torch.zeros_like(t) for t in src]
    ref = [torch.zeros_like(t) for t in src]
    lib = _ffi.cuda_lib()
    before = lib.lmc_cuda_launch_count()
    CudaPagedMemory(layout, dst).request(table).write_chunks([io])
    assert lib.lmc_cuda_launch_count() - before == 1, "the kernel path did not run"
    TorchPagedKV(layout, ref, table).write_chunks([io])
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(dst, ref))
    written = sum(int(torch.count_nonzero(t)) for t in dst)
    assert written == layout.chunk_bytes(until) // layout.element_size
    pool.close()


@pytest.mark.gpu
def test_offsets_past_two_gib_in_a_plane():
    """Blocks at the end of a 4 GiB layer: byte offsets past 2**31 must not wrap."""
    import torch
    from lmcache_cuda.cuda import CudaPagedMemory
    from lmcache_cuda.reference import TorchPagedKV

    layout = KVLayout("vllm_flash", "bfloat16", 1, 1, 128, 16)  # 4 KiB per block and plane
    nb = (1 << 31) // 4096 + 64  # each plane just over 2 GiB
    (layer,) = layers = [torch.zeros((2, nb, 16, 1, 128), dtype=torch.int16, device="cuda")]
    table = list(range(nb - 8, nb))
    g = torch.Generator(device="cuda").manual_seed(1)
    layer.zero_()
    fresh = torch.randint(1, 2**15 - 1, (2, 8, 16, 1, 128), generator=g, device="cuda")
    layer[:, nb - 8 :].copy_(fresh)
    ntok = 8 * 16
    n = layout.chunk_bytes(ntok)
    pool = _pool(n, 2)
    a, b = pool.allocate(None, 1, n), pool.allocate(None, 1, n)  # type: ignore[arg-type]
    CudaPagedMemory(layout, layers).request(table).read_chunks([ChunkIO(0, ntok, a.view[:n])])
    TorchPagedKV(layout, layers, table).read_chunks([ChunkIO(0, ntok, b.view[:n])])
    assert bytes(a.view[:n]) == bytes(b.view[:n]) and np.frombuffer(a.view[:n], np.uint8).any()
    original = layer[:, nb - 8 :].clone()
    layer[:, nb - 8 :].zero_()
    CudaPagedMemory(layout, layers).request(table).write_chunks([ChunkIO(0, ntok, a.view[:n])])
    torch.cuda.synchronize()
    assert torch.equal(layer[:, nb - 8 :], original)
    assert not bool(layer[:, : nb - 8].any())  # nothing written below the blocks asked for
    del layer, layers
    pool.close()


def _engine_round_trip(tmp_path, device: str) -> None:
    """What vLLM's worker does: store from the engine's KV into the DRAM tier (pinned
    on a GPU) and on to disk, then load into other blocks of an emptied cache."""
    import torch
    from lmcache_core.config import CacheConfig
    from lmcache_core.engine import CacheEngine
    from lmcache_core.pool import SLOT_OFFSET
    from lmcache_core.transfer_numpy import layer_shape
    from lmcache_cuda import paged_memory

    layout = KVLayout("vllm_flash", "bfloat16", 4, 2, 64, 16)
    config = CacheConfig.from_dict(
        {
            "chunk_size": 64,
            "max_local_cpu_size": "8MiB",
            "local_disk": str(tmp_path / "disk"),
            "max_local_disk_size": "64MiB",
        }
    )
    arena = None
    if device == "cuda":
        from lmcache_cuda.pinned import PinnedArena

        arena = PinnedArena(config.max_local_cpu_size + SLOT_OFFSET)
    engine = CacheEngine(config, model="gpu/smoke", layout=layout, arena=arena)
    nb, ntok = 48, 200
    g = torch.Generator(device=device).manual_seed(3)
    shape = layer_shape(layout, nb)
    src = [
        torch.randint(1, 2**15 - 1, shape, dtype=torch.int16, device=device, generator=g)
        for _ in range(layout.num_layers)
    ]
    tokens = list(range(1000, 1000 + ntok))
    table_a, table_b = list(range(0, 13)), list(range(20, 33))
    lib = _ffi.cuda_lib() if device == "cuda" else None
    before = lib.lmc_cuda_launch_count() if lib else 0
    try:
        assert engine.store(tokens, paged_memory(layout, src)(table_a)) == ntok
        assert engine.flush(30)
        dst = [torch.zeros_like(t) for t in src]
        assert engine.retrieve(tokens, paged_memory(layout, dst)(table_b)) == ntok
        if lib is not None:  # the kernels moved it, not the torch fallback
            assert lib.lmc_cuda_launch_count() - before >= 2 * -(-ntok // 64)
            torch.cuda.synchronize()
        for s, d in zip(src, dst):  # (K/V, block, token, head, dim): tokens in table order
            want = s[:, table_a].reshape(2, -1, 2, 64)[:, :ntok]
            got = d[:, table_b].reshape(2, -1, 2, 64)[:, :ntok]
            assert torch.equal(want, got)
            assert not bool(d[:, : table_b[0]].any())  # blocks not in the table untouched
    finally:
        engine.close()


def test_cache_engine_round_trip_on_the_cpu(tmp_path):
    pytest.importorskip("torch")
    _engine_round_trip(tmp_path, "cpu")


@pytest.mark.gpu
def test_cache_engine_round_trip_through_the_pinned_arena(tmp_path):
    _engine_round_trip(tmp_path, "cuda")
