"""KV layouts and the numpy transfer, checked against a per-token reference of the chunk format."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmcache_core.errors import LayoutError
from lmcache_core.layout import KVLayout, LayoutKind
from lmcache_core.transfer import ChunkIO
from lmcache_core.transfer_numpy import NumpyPagedKV, layer_shape


def reference_chunk(layout: KVLayout, layers, table, start: int, end: int) -> bytes:
    """The chunk format, written token by token from its definition in lmcache_core.layout."""
    bs = layout.block_size
    out = []
    for layer in layers:
        if layout.kind is LayoutKind.VLLM_CPU:
            for b in range(start // bs, end // bs):
                out.append(layer[table[b]].tobytes())
            continue
        for plane in range(layout.kv_planes):
            for t in range(start, end):
                blk, row = table[t // bs], t % bs
                if layout.kind is LayoutKind.VLLM_FLASH:
                    out.append(layer[plane, blk, row].tobytes())
                elif layout.kind is LayoutKind.VLLM_FLASH_BLOCKS_FIRST:
                    out.append(layer[blk, plane, row].tobytes())
                else:
                    out.append(layer[blk, row].tobytes())
    return b"".join(out)


layouts = st.builds(
    lambda kind, dtype, nl, heads, hs, bs: KVLayout(
        kind=kind,
        dtype=dtype,
        num_layers=nl,
        num_kv_heads=1 if kind == "mla" else heads,
        head_size=hs,
        block_size=bs,
    ),
    kind=st.sampled_from(["vllm_flash", "vllm_flash_blocks_first", "vllm_cpu", "mla"]),
    dtype=st.sampled_from(["bfloat16", "float16", "float32", "float8_e4m3fn"]),
    nl=st.integers(1, 3),
    heads=st.integers(1, 3),
    hs=st.sampled_from([1, 4, 8]),
    bs=st.sampled_from([1, 2, 4, 16]),
)
_NP = {1: np.uint8, 2: np.uint16, 4: np.uint32}


@settings(max_examples=80, deadline=None)
@given(layout=layouts, data=st.data())
def test_gather_matches_reference_and_scatter_round_trips(layout, data):
    num_blocks = data.draw(st.integers(2, 12))
    n_req_blocks = data.draw(st.integers(1, num_blocks))
    table = data.draw(st.permutations(range(num_blocks)))[:n_req_blocks]
    max_tok = n_req_blocks * layout.block_size
    if layout.kind is LayoutKind.VLLM_CPU:
        b0 = data.draw(st.integers(0, n_req_blocks - 1))
        b1 = data.draw(st.integers(b0 + 1, n_req_blocks))
        start, end = b0 * layout.block_size, b1 * layout.block_size
    else:
        start = data.draw(st.integers(0, max_tok - 1))
        end = data.draw(st.integers(start + 1, max_tok))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dt = _NP[layout.element_size]
    src = [
        rng.integers(1, np.iinfo(dt).max, size=layer_shape(layout, num_blocks), dtype=dt)
        for _ in range(layout.num_layers)
    ]
    kv = NumpyPagedKV(layout, src, table, threads=data.draw(st.sampled_from([1, 2])))
    buf = bytearray(layout.chunk_bytes(end - start))
    kv.read_chunks([ChunkIO(start, end, memoryview(buf))])
    assert bytes(buf) == reference_chunk(layout, src, table, start, end)

    dst = [np.zeros_like(a) for a in src]
    write_from = data.draw(st.integers(start, end))
    NumpyPagedKV(layout, dst, table).write_chunks(
        [ChunkIO(start, end, memoryview(buf), write_from)]
    )
    bs = layout.block_size
    first = (
        write_from
        if layout.kind is not LayoutKind.VLLM_CPU
        else (start + ((write_from - start) // bs) * bs)
    )
    if first < end:
        back = bytearray(layout.chunk_bytes(end - first))
        NumpyPagedKV(layout, dst, table).read_chunks([ChunkIO(first, end, memoryview(back))])
        assert bytes(back) == reference_chunk(layout, src, table, first, end)
    if first > start:
        before = bytearray(layout.chunk_bytes(first - start))
        NumpyPagedKV(layout, dst, table).read_chunks([ChunkIO(start, first, memoryview(before))])
        assert not any(before), "tokens before write_from were written"


def test_layout_validation_names_each_problem():
    with pytest.raises(LayoutError) as e:
        KVLayout(
            kind="paged", dtype="int4", num_layers=0, num_kv_heads=1, head_size=8, block_size=16
        )
    msg = str(e.value)
    assert "kind='paged'" in msg and "dtype='int4'" in msg and "num_layers=0" in msg
    with pytest.raises(LayoutError, match="one latent head"):
        KVLayout(
            kind="mla", dtype="bfloat16", num_layers=1, num_kv_heads=2, head_size=8, block_size=16
        )


def test_chunk_size_must_cover_whole_opaque_blocks():
    cpu = KVLayout(
        kind="vllm_cpu", dtype="bfloat16", num_layers=1, num_kv_heads=1, head_size=8, block_size=128
    )
    with pytest.raises(LayoutError, match="set chunk_size to a multiple of 128"):
        cpu.check_chunk_size(200)
    cpu.check_chunk_size(256)
    flash = KVLayout(
        kind="vllm_flash",
        dtype="bfloat16",
        num_layers=1,
        num_kv_heads=1,
        head_size=8,
        block_size=16,
    )
    flash.check_chunk_size(200)  # token-granular format: any chunk size


def test_llama3_8b_chunk_is_32_mib():
    layout = KVLayout(
        kind="vllm_flash",
        dtype="bfloat16",
        num_layers=32,
        num_kv_heads=8,
        head_size=128,
        block_size=16,
    )
    assert layout.chunk_bytes(256) == 32 * 1024**2
    assert layout.fingerprint()["chunk_format"] == "neutral-v1"


def test_bad_buffers_and_tables_are_refused_before_copying():
    layout = KVLayout(
        kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=1, head_size=4, block_size=4
    )
    good = [np.ones(layer_shape(layout, 4), dtype=np.uint16) for _ in range(2)]
    with pytest.raises(LayoutError, match="expected 2 layer arrays"):
        NumpyPagedKV(layout, good[:1], [0])
    with pytest.raises(LayoutError, match="outside"):
        NumpyPagedKV(layout, good, [0, 4])
    with pytest.raises(LayoutError, match="1-byte elements"):
        NumpyPagedKV(layout, [a.view(np.uint8) for a in good], [0])
    with pytest.raises(LayoutError, match="C-contiguous"):
        NumpyPagedKV(layout, [a[:, ::-1] for a in good], [0])
    kv = NumpyPagedKV(layout, good, [0, 1])
    with pytest.raises(LayoutError, match="layout needs"):
        kv.read_chunks([ChunkIO(0, 4, memoryview(bytearray(3)))])
    with pytest.raises(LayoutError, match="block table has 2"):
        kv.read_chunks([ChunkIO(0, 12, memoryview(bytearray(layout.chunk_bytes(12))))])
    assert all(a.min() == 1 for a in good)
