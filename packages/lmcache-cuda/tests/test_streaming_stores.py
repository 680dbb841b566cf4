"""Streaming stores in the C kernels: large copies take them, and they copy exactly what
memcpy does.

A copy of at least ``LMCACHE_CPU_STREAM_MIN_BYTES`` (4 MiB by default) writes its
destination's whole cache lines with non-temporal stores (``csrc/lmcache_cpu.c``
says why: about twice the bandwidth for KV chunks). The library counts the bytes
it streamed, so these tests can tell that the path ran: on destinations at every
alignment, and under the kernels' own property suites with every copy streamed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from lmcache_core.layout import KVLayout
from lmcache_core.transfer import ChunkIO
from lmcache_core.transfer_numpy import NumpyPagedKV, layer_shape
from lmcache_cuda import _ffi
from lmcache_cuda.paged import CPagedKV

X86 = platform.machine().lower() in ("x86_64", "amd64")
TESTS = Path(__file__).resolve().parent
ENV = "LMCACHE_CPU_STREAM_MIN_BYTES"

pytestmark = pytest.mark.skipif(_ffi.cpu_lib() is None, reason="no C compiler here")

# 2 KiB rows (8 heads x 128 x bf16), 16-row blocks, 4 layers: a 256-token chunk is 4 MiB.
LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=4, num_kv_heads=8, head_size=128,
    block_size=16,
)  # fmt: skip
TOKENS = 256


def _layers(nb: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(1, 2**16 - 1, size=layer_shape(LAYOUT, nb), dtype=np.uint16)
        for _ in range(LAYOUT.num_layers)
    ]


def _streamed() -> int:
    return int(_ffi.cpu_lib().lmc_cpu_streamed_bytes())


@pytest.mark.skipif(ENV in os.environ, reason=f"{ENV} is set in this environment")
@pytest.mark.parametrize("offset", [0, 1, 8, 17, 63])
def test_a_chunk_copy_streams_and_equals_the_reference_at_any_alignment(offset):
    nb = 2 * TOKENS // LAYOUT.block_size
    table = np.random.default_rng(offset).permutation(nb)[: TOKENS // LAYOUT.block_size].tolist()
    src = _layers(nb, seed=offset)
    n = LAYOUT.chunk_bytes(TOKENS)
    assert n == 4 << 20  # the default threshold: this copy is the smallest that streams

    ref = bytearray(n)
    NumpyPagedKV(LAYOUT, src, table).read_chunks([ChunkIO(0, TOKENS, memoryview(ref))])
    raw = bytearray(n + 128)  # the chunk starts `offset` bytes past a line
    start = (-np.frombuffer(raw, dtype=np.uint8).ctypes.data) % 64 + offset
    got = memoryview(raw)[start : start + n]
    before = _streamed()
    CPagedKV(LAYOUT, src, table).read_chunks([ChunkIO(0, TOKENS, got)])
    assert bytes(got) == bytes(ref)
    assert raw[:start] == bytearray(start) and raw[start + n :] == bytearray(len(raw) - start - n)
    if X86:  # every run is streamed but for the partial lines at its ends
        assert 0.99 * n <= _streamed() - before <= n

    # Scatter from the unaligned chunk: streamed into the blocks, equal to numpy's.
    dst_c, dst_n = [np.zeros_like(a) for a in src], [np.zeros_like(a) for a in src]
    before = _streamed()
    CPagedKV(LAYOUT, dst_c, table).write_chunks([ChunkIO(0, TOKENS, got)])
    NumpyPagedKV(LAYOUT, dst_n, table).write_chunks([ChunkIO(0, TOKENS, memoryview(ref))])
    for a, b in zip(dst_c, dst_n):
        assert np.array_equal(a, b)
    if X86:
        assert 0.99 * n <= _streamed() - before <= n


@pytest.mark.skipif(ENV in os.environ, reason=f"{ENV} is set in this environment")
def test_a_copy_under_the_threshold_keeps_ordinary_stores():
    tokens = TOKENS - 1  # 16 KiB under 4 MiB
    nb = 2 * TOKENS // LAYOUT.block_size
    src = _layers(nb, seed=3)
    table = list(range(TOKENS // LAYOUT.block_size))
    buf = bytearray(LAYOUT.chunk_bytes(tokens))
    before = _streamed()
    CPagedKV(LAYOUT, src, table).read_chunks([ChunkIO(0, tokens, memoryview(buf))])
    assert _streamed() == before
    ref = bytearray(len(buf))
    NumpyPagedKV(LAYOUT, src, table).read_chunks([ChunkIO(0, tokens, memoryview(ref))])
    assert buf == ref


def _run(env_value: str, code: str, tmp_path: Path) -> str:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, ENV: env_value, "PYTHONPATH": path}
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not X86, reason="streaming stores are x86-64 only")
def test_the_kernel_property_suites_pass_with_every_copy_streamed(tmp_path):
    """The gather/scatter and strided-layout properties, rerun with a threshold of 0."""
    pytest.importorskip("torch")  # those suites compare with the torch reference
    out = _run(
        "0",
        """
        import test_kernels, test_strided_layouts
        from lmcache_cuda import _ffi
        test_kernels.test_c_numpy_and_torch_agree_and_round_trip()
        test_kernels.test_a_chunk_reaching_past_the_table_writes_only_its_write_range()
        test_strided_layouts.test_c_kernels_and_torch_reference_match_the_oracle()
        print(_ffi.cpu_lib().lmc_cpu_streamed_bytes())
        """,
        tmp_path,
    )
    assert int(out) > 0


def test_a_negative_threshold_turns_streaming_off(tmp_path):
    out = _run(
        "-1",
        """
        import numpy as np
        from test_streaming_stores import LAYOUT, TOKENS, _layers
        from lmcache_core.transfer import ChunkIO
        from lmcache_cuda import _ffi
        from lmcache_cuda.paged import CPagedKV
        src = _layers(TOKENS // LAYOUT.block_size, seed=1)
        buf = bytearray(LAYOUT.chunk_bytes(TOKENS))
        CPagedKV(LAYOUT, src, list(range(len(src[0][0])))).read_chunks(
            [ChunkIO(0, TOKENS, memoryview(buf))]
        )
        assert any(buf)
        print(_ffi.cpu_lib().lmc_cpu_streamed_bytes())
        """,
        tmp_path,
    )
    assert int(out) == 0
