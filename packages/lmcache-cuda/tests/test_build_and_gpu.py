"""Builds (C and CUDA, warnings as errors), the wheel's build hook, and the GPU path.

CUDA code is compiled here on every run so it cannot rot on machines without a
GPU; the tests that run it are marked ``gpu`` and skipped where there is none.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from lmcache_core.layout import KVLayout
from lmcache_core.pool import SLOT_OFFSET, SlotPool
from lmcache_core.transfer import ChunkIO
from lmcache_cuda import _ffi, build

PKG = Path(__file__).resolve().parents[1]


def test_c_kernels_compile_with_warnings_as_errors(tmp_path):
    lib = build.build_cpu(tmp_path, werror=True)
    opened = _ffi.ffi().dlopen(str(lib))
    assert opened.lmc_abi_version() == opened.LMC_ABI_VERSION


def _visible_gpus() -> int:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


@pytest.mark.skipif(build.nvcc() is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_with_warnings_as_errors(tmp_path):
    lib = build.build_cuda(tmp_path, werror=True)
    opened = _ffi.ffi().dlopen(str(lib))
    assert opened.lmc_abi_version() == opened.LMC_ABI_VERSION
    # Loading needs no GPU; asking for devices answers as many as the driver shows
    # (0 without one), never crashes.
    assert opened.lmc_cuda_device_count() == _visible_gpus()


def test_wheel_build_hook_ships_the_libraries_with_a_platform_tag(tmp_path):
    src = tmp_path / "lmcache-cuda"
    shutil.copytree(PKG, src, ignore=shutil.ignore_patterns("_lib", "__pycache__", "*.so"))
    env = {"LMCACHE_BUILD_CUDA": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path / "dist")],
        cwd=src,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert "py3-none-any" not in wheel.name, "a wheel with a compiled library is platform-specific"
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmcache_cuda/_lib/liblmcache_cpu.so" in names
    assert "lmcache_cuda/csrc/lmcache_kernels.h" in names


# --------------------------------------------------------------------------- GPU

LAYOUTS = [
    KVLayout("vllm_flash", "bfloat16", 4, 8, 128, 16),
    KVLayout("vllm_flash_blocks_first", "float16", 3, 2, 64, 16),
    KVLayout("mla", "bfloat16", 2, 1, 576, 64),
    KVLayout("vllm_flash", "float8_e4m3fn", 2, 4, 96, 16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.kind.value}-{lay.dtype}")
def test_cuda_kernels_agree_with_the_torch_reference(layout):
    import torch
    from lmcache_core.transfer_numpy import layer_shape
    from lmcache_cuda.cuda import CudaPagedMemory
    from lmcache_cuda.pinned import PinnedArena
    from lmcache_cuda.reference import TorchPagedKV

    nb, ntok = 64, 200
    g = torch.Generator(device="cuda").manual_seed(0)
    int_t = {1: torch.uint8, 2: torch.int16}[layout.element_size]
    hi = 255 if layout.element_size == 1 else 2**15 - 1
    layers = [
        torch.randint(1, hi, layer_shape(layout, nb), dtype=int_t, device="cuda", generator=g)
        for _ in range(layout.num_layers)
    ]
    table = torch.randperm(nb)[: -(-ntok // layout.block_size)].tolist()
    n = layout.chunk_bytes(ntok)
    pool = SlotPool(PinnedArena(2 * n + SLOT_OFFSET + 4096), n)
    a = pool.allocate(None, ntok, n)  # type: ignore[arg-type]
    b = pool.allocate(None, ntok, n)  # type: ignore[arg-type]
    mem = CudaPagedMemory(layout, layers)
    mem.request(table).read_chunks([ChunkIO(0, ntok, a.view)])
    TorchPagedKV(layout, layers, table).read_chunks([ChunkIO(0, ntok, b.view)])
    assert bytes(a.view) == bytes(b.view)
    assert np.frombuffer(a.view, np.uint8).any()
    dst = [torch.zeros_like(t) for t in layers]
    ref = [torch.zeros_like(t) for t in layers]
    mem2 = CudaPagedMemory(layout, dst)
    mem2.request(table).write_chunks([ChunkIO(0, ntok, a.view, 37)])
    TorchPagedKV(layout, ref, table).write_chunks([ChunkIO(0, ntok, b.view, 37)])
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(dst, ref))
    assert any(bool(x.any()) for x in dst), "the scatter wrote nothing"
