"""The transfer kernels: every implementation agrees byte for byte with the references.

C kernels (``CPagedKV``), core's numpy reference and the pure-torch reference
run on the same random layouts, tables and data; gather then scatter must
round-trip exactly. Bad arguments raise a clear error before memory is touched.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmcache_core.errors import LayoutError
from lmcache_core.layout import KVLayout, LayoutKind
from lmcache_core.transfer import ChunkIO
from lmcache_core.transfer_numpy import NumpyPagedKV, layer_shape
from lmcache_cuda import _ffi, kernels_available, paged_memory
from lmcache_cuda.paged import CPagedKV, CPagedMemory, Planes

torch = pytest.importorskip("torch")
from lmcache_cuda.reference import TorchPagedKV  # noqa: E402

INT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32}
TORCH_DTYPE = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.uint8,  # fp8 moves as bytes
}

layouts = st.builds(
    lambda kind, nl, heads, hs, bs, dtype: KVLayout(
        kind=kind,
        dtype=dtype,
        num_layers=nl,
        num_kv_heads=1 if kind == "mla" else heads,
        head_size=hs,
        block_size=bs,
    ),
    kind=st.sampled_from(["vllm_flash", "vllm_flash_blocks_first", "vllm_cpu", "mla"]),
    nl=st.integers(1, 4),
    heads=st.integers(1, 4),
    hs=st.sampled_from([1, 3, 8, 64, 128]),
    bs=st.sampled_from([1, 2, 16]),
    dtype=st.sampled_from(list(TORCH_DTYPE)),
)


def _random_layers(layout: KVLayout, nb: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    it = INT_OF_SIZE[layout.element_size]
    hi = 2 ** (8 * layout.element_size) - 1
    return [
        rng.integers(1, hi, size=layer_shape(layout, nb), dtype=it)  # never zero
        for _ in range(layout.num_layers)
    ]


def _as_torch(layout: KVLayout, arrs: list[np.ndarray]) -> list:
    return [torch.from_numpy(a).view(TORCH_DTYPE[layout.dtype]) for a in arrs]


def _draw_range(data, layout: KVLayout, n_req: int) -> tuple[int, int]:
    bs = layout.block_size
    if layout.kind is LayoutKind.VLLM_CPU:
        b0 = data.draw(st.integers(0, n_req - 1))
        return b0 * bs, data.draw(st.integers(b0 + 1, n_req)) * bs
    start = data.draw(st.integers(0, n_req * bs - 1))
    return start, data.draw(st.integers(start + 1, n_req * bs))


@settings(max_examples=120, deadline=None)
@given(layout=layouts, data=st.data())
def test_c_numpy_and_torch_agree_and_round_trip(layout, data):
    nb = data.draw(st.integers(2, 12))
    n_req = data.draw(st.integers(1, nb))
    table = data.draw(st.permutations(range(nb)))[:n_req]
    start, end = _draw_range(data, layout, n_req)
    src = _random_layers(layout, nb, data.draw(st.integers(0, 2**31)))
    n = layout.chunk_bytes(end - start)

    ref = bytearray(n)
    NumpyPagedKV(layout, src, table).read_chunks([ChunkIO(start, end, memoryview(ref))])
    got_c = bytearray(n)
    CPagedKV(layout, src, table).read_chunks([ChunkIO(start, end, memoryview(got_c))])
    got_t = bytearray(n)
    TorchPagedKV(layout, _as_torch(layout, src), table).read_chunks(
        [ChunkIO(start, end, memoryview(got_t))]
    )
    assert got_c == ref
    assert got_t == ref
    # Every source element is non-zero: a gathered element of zero is one never copied.
    assert np.all(np.frombuffer(bytes(ref), dtype=f"u{layout.element_size}") != 0)

    # Scatter a sub-range into fresh memory with each implementation.
    w_from = data.draw(st.integers(start, end))
    if layout.kind is LayoutKind.VLLM_CPU:
        w_from = start + ((w_from - start) // layout.block_size) * layout.block_size
    io = ChunkIO(start, end, memoryview(ref), w_from, end)
    dst_n = [np.zeros_like(a) for a in src]
    dst_c = [np.zeros_like(a) for a in src]
    dst_t = [np.zeros_like(a) for a in src]
    NumpyPagedKV(layout, dst_n, table).write_chunks([io])
    CPagedKV(layout, dst_c, table).write_chunks([io])
    TorchPagedKV(layout, _as_torch(layout, dst_t), table).write_chunks([io])
    for a, b, c in zip(dst_n, dst_c, dst_t):
        assert np.array_equal(a, b)
        assert np.array_equal(a, c)

    # Round trip: gather what was scattered (whole range) gives the chunk back.
    if w_from == start:
        back = bytearray(n)
        CPagedKV(layout, dst_c, table).read_chunks([ChunkIO(start, end, memoryview(back))])
        assert back == ref


@settings(max_examples=60, deadline=None)
@given(layout=layouts, data=st.data())
def test_a_chunk_reaching_past_the_table_writes_only_its_write_range(layout, data):
    """A longer stored chunk whose first tokens a request loads (hits inside a chunk):
    every writer touches the blocks of the write range alone, the same bytes."""
    bs = layout.block_size
    nb = data.draw(st.integers(3, 12))
    n_req = data.draw(st.integers(1, nb - 1))  # the request's blocks
    table = data.draw(st.permutations(range(nb)))[:n_req]
    start = data.draw(st.integers(0, n_req - 1)) * bs
    until = data.draw(st.integers(start // bs + 1, n_req)) * bs
    if layout.kind is not LayoutKind.VLLM_CPU:
        until = data.draw(st.integers(start + 1, until))
    end = data.draw(st.integers(n_req * bs + 1, nb * bs))  # past the table
    if layout.kind is LayoutKind.VLLM_CPU:
        end = -(-end // bs) * bs
    src = _random_layers(layout, nb, data.draw(st.integers(0, 2**31)))
    chunk = bytearray(layout.chunk_bytes(end - start))
    NumpyPagedKV(layout, src, list(range(nb))).read_chunks([ChunkIO(start, end, memoryview(chunk))])
    io = ChunkIO(start, end, memoryview(chunk), 0, until)
    dst_n, dst_c, dst_t = ([np.zeros_like(a) for a in src] for _ in range(3))
    NumpyPagedKV(layout, dst_n, table).write_chunks([io])
    CPagedKV(layout, dst_c, table).write_chunks([io])
    TorchPagedKV(layout, _as_torch(layout, dst_t), table).write_chunks([io])
    for a, b, c in zip(dst_n, dst_c, dst_t):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    # What landed is tokens [start, until) of the chunk, nothing else.
    n = until - start
    got = bytearray(layout.chunk_bytes(n))
    NumpyPagedKV(layout, dst_n, table).read_chunks([ChunkIO(start, until, memoryview(got))])
    want = bytearray(layout.chunk_bytes(n))
    NumpyPagedKV(layout, src, list(range(nb))).read_chunks(
        [ChunkIO(start, until, memoryview(want))]
    )
    assert got == want
    written = sum(int(np.count_nonzero(a)) for a in dst_n)
    assert written == layout.chunk_bytes(n) // layout.element_size


def test_torch_cpu_tensors_go_through_the_c_kernels():
    layout = KVLayout("vllm_flash", "bfloat16", 2, 2, 8, 4)
    src = _random_layers(layout, 8, 1)
    tensors = _as_torch(layout, src)
    make = paged_memory(layout, tensors)
    kv = make([3, 1, 4])
    assert isinstance(kv, CPagedKV)
    got, ref = bytearray(layout.chunk_bytes(12)), bytearray(layout.chunk_bytes(12))
    kv.read_chunks([ChunkIO(0, 12, memoryview(got))])
    NumpyPagedKV(layout, src, [3, 1, 4]).read_chunks([ChunkIO(0, 12, memoryview(ref))])
    assert got == ref


def test_sglang_style_separate_k_and_v_buffers_through_planes():
    """SGLang keeps per-layer K and V buffers [slots, heads, head_size], paged by page size."""
    layout = KVLayout("sglang_token", "float16", 2, 2, 4, 4)  # page size 4
    slots, row = 32, 2 * 4 * 2
    rng = np.random.default_rng(3)
    bufs = [rng.integers(1, 2**16 - 1, size=(slots, 2, 4), dtype=np.uint16) for _ in range(4)]
    planes = Planes(
        bases=tuple(int(b.__array_interface__["data"][0]) for b in bufs),  # L0.K L0.V L1.K L1.V
        block_stride=4 * row,
        row_stride=row,
        row_bytes=row,
        rows_per_block=4,
        num_blocks=slots // 4,
    )
    pages = [5, 2, 7]
    kv = CPagedKV.from_planes(layout, planes, pages, keepalive=bufs)
    got = bytearray(layout.chunk_bytes(10))
    kv.read_chunks([ChunkIO(0, 10, memoryview(got))])
    tokens = [p * 4 + i for p in pages for i in range(4)][:10]
    want = b"".join(bufs[p][tokens].tobytes() for p in range(4))
    assert got == want


# --------------------------------------------------------------------------- bad arguments

LAYOUT = KVLayout("vllm_flash", "bfloat16", 2, 2, 8, 4)


@pytest.fixture
def layers():
    return _random_layers(LAYOUT, 8, 0)


def test_bad_arguments_raise_clear_errors_before_any_copy(layers):
    buf = bytearray(LAYOUT.chunk_bytes(8))
    with pytest.raises(LayoutError, match="outside"):
        CPagedKV(LAYOUT, layers, [0, 8])
    with pytest.raises(LayoutError, match="expected 2 layer"):
        CPagedKV(LAYOUT, layers[:1], [0, 1])
    with pytest.raises(LayoutError, match="4-byte elements"):
        CPagedKV(LAYOUT, [a.view(np.uint32).reshape(*a.shape[:-1], -1) for a in layers], [0])
    with pytest.raises(LayoutError, match="contiguous"):
        CPagedKV(LAYOUT, [np.asfortranarray(a) for a in layers], [0])
    with pytest.raises(LayoutError, match="shape"):
        CPagedKV(LAYOUT, [a.reshape(2, 8, 4, 16, 1) for a in layers], [0])
    kv = CPagedKV(LAYOUT, layers, [0, 1])
    with pytest.raises(LayoutError, match="bytes, the layout needs"):
        kv.read_chunks([ChunkIO(0, 8, memoryview(bytearray(10)))])
    with pytest.raises(LayoutError, match="block table has 2"):
        kv.read_chunks([ChunkIO(0, 12, memoryview(bytearray(LAYOUT.chunk_bytes(12))))])
    with pytest.raises(LayoutError, match="read-only"):
        kv.read_chunks([ChunkIO(0, 8, memoryview(bytes(len(buf))))])
    with pytest.raises(LayoutError, match="host memory"):

        class OnGPU:
            device = type("D", (), {"type": "cuda"})()

            def data_ptr(self):
                return 0

            def element_size(self):
                return 2

        CPagedKV(LAYOUT, [OnGPU(), OnGPU()], [0])


def test_the_c_abi_itself_refuses_bad_block_ids_without_touching_memory(layers):
    lib = _ffi.cpu_lib()
    ffi = _ffi.ffi()
    mem = CPagedMemory(LAYOUT, layers)
    table = np.array([0, 99], dtype=np.int64)  # 99 is out of range
    out = bytearray(b"\xab" * LAYOUT.chunk_bytes(8))
    rc = lib.lmc_cpu_gather(
        mem.desc, ffi.cast("int64_t *", table.ctypes.data), 2, 0, 8, ffi.from_buffer(out), 0, 8, 1
    )
    assert rc == lib.LMC_EBLOCK
    assert out == bytearray(b"\xab" * len(out))
    rc = lib.lmc_cpu_gather(
        mem.desc, ffi.cast("int64_t *", table.ctypes.data), 2, 4, 2, ffi.from_buffer(out), 0, 8, 1
    )
    assert rc == lib.LMC_EINVAL  # row_lo > row_hi


def test_kernels_build_and_load_here():
    assert kernels_available()["c"]
    assert _ffi.cpu_lib().lmc_abi_version() == _ffi.cpu_lib().LMC_ABI_VERSION == 4


def test_missing_c_library_falls_back_to_torch_with_a_warning(monkeypatch, layers):
    monkeypatch.setattr(_ffi, "cpu_lib", lambda: None)
    tensors = _as_torch(LAYOUT, layers)
    with pytest.warns(RuntimeWarning, match="torch reference"):
        make = paged_memory(LAYOUT, tensors)
    kv = make([1, 2])
    assert isinstance(kv, TorchPagedKV)
    got = bytearray(LAYOUT.chunk_bytes(8))
    kv.read_chunks([ChunkIO(0, 8, memoryview(got))])
    ref = bytearray(len(got))
    NumpyPagedKV(LAYOUT, layers, [1, 2]).read_chunks([ChunkIO(0, 8, memoryview(ref))])
    assert got == ref


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_token_plane_layouts_c_agrees_with_the_torch_reference(data):
    """SGLang-style K and V buffers per layer, paged by page size, random everything."""
    from lmcache_cuda.reference import TorchTokenPlanesKV

    nl, heads = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    hs, ps = data.draw(st.sampled_from([1, 8, 64])), data.draw(st.sampled_from([1, 4, 16]))
    layout = KVLayout("sglang_token", "bfloat16", nl, heads, hs, ps)
    pages = data.draw(st.integers(2, 10))
    slots = pages * ps + data.draw(st.integers(0, ps))  # SGLang pads its buffers
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    bufs = [rng.integers(1, 2**16 - 1, (slots, heads, hs), dtype=np.uint16) for _ in range(2 * nl)]
    n_req = data.draw(st.integers(1, pages))
    table = data.draw(st.permutations(range(pages)))[:n_req]
    start = data.draw(st.integers(0, n_req * ps - 1))
    end = data.draw(st.integers(start + 1, n_req * ps))
    row = heads * hs * 2
    planes = Planes(
        tuple(int(b.__array_interface__["data"][0]) for b in bufs),
        ps * row,
        row,
        row,
        ps,
        slots // ps,
    )
    n = layout.chunk_bytes(end - start)
    got_c, got_t = bytearray(n), bytearray(n)
    CPagedKV.from_planes(layout, planes, table, keepalive=bufs).read_chunks(
        [ChunkIO(start, end, memoryview(got_c))]
    )
    tens = [torch.from_numpy(b).view(torch.bfloat16) for b in bufs]
    TorchTokenPlanesKV(layout, tens, table).read_chunks([ChunkIO(start, end, memoryview(got_t))])
    assert got_c == got_t
    w_from = data.draw(st.integers(start, end))
    dst_c = [np.zeros_like(b) for b in bufs]
    dst_t = [np.zeros_like(b) for b in bufs]
    planes_c = Planes(
        tuple(int(b.__array_interface__["data"][0]) for b in dst_c), ps * row, row, row, ps,
        slots // ps,
    )  # fmt: skip
    io = ChunkIO(start, end, memoryview(got_c), w_from, end)
    CPagedKV.from_planes(layout, planes_c, table, keepalive=dst_c).write_chunks([io])
    TorchTokenPlanesKV(layout, [torch.from_numpy(b) for b in dst_t], table).write_chunks([io])
    assert all(np.array_equal(a, b) for a, b in zip(dst_c, dst_t))
