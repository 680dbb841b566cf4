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
    # ... but not Python-specific: the libraries are opened with cffi's ABI mode.
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl") or "x86_64" not in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmcache_cuda/_lib/liblmcache_cpu.so" in names
    assert "lmcache_cuda/_lib/liblmcache_cpu.so.sha256" in names  # not rebuilt when installed
    assert "lmcache_cuda/csrc/lmcache_kernels.h" in names


def test_a_library_built_from_other_sources_is_rebuilt_at_load(tmp_path, monkeypatch):
    if build.c_compiler() is None:
        pytest.skip("needs a C compiler")
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    monkeypatch.setattr(build, "CSRC", csrc)
    monkeypatch.setattr(build, "LIB_DIR", tmp_path / "_lib")
    lib = build.build_cpu(tmp_path / "_lib")
    assert not build.is_stale(lib, build.CPU_LIB)
    _ffi.cpu_lib.cache_clear()
    try:
        _ffi.cpu_lib()
        assert lib.stat().st_mtime_ns == (mtime := lib.stat().st_mtime_ns)  # fresh: kept
        # A changed source (an upgrade that kept the ABI version) makes it stale.
        src = csrc / "lmcache_cpu.c"
        src.write_text(src.read_text() + "\n/* changed */\n")
        assert build.is_stale(lib, build.CPU_LIB)
        _ffi.cpu_lib.cache_clear()
        assert _ffi.cpu_lib() is not None
        assert not build.is_stale(lib, build.CPU_LIB)
        assert lib.stat().st_mtime_ns != mtime  # rebuilt
    finally:
        _ffi.cpu_lib.cache_clear()


def test_a_cpu_engine_does_not_build_the_cuda_library(monkeypatch):
    import lmcache_cuda

    def no(*a, **k):
        raise AssertionError("the CUDA library was asked for by a CPU engine")

    monkeypatch.setattr(_ffi, "cuda_lib", no)
    layout = KVLayout("vllm_flash", "bfloat16", 2, 2, 8, 4)
    layers = [np.zeros((2, 8, 4, 2, 8), dtype=np.uint16) for _ in range(2)]
    assert lmcache_cuda.paged_memory(layout, layers) is not None


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


@pytest.mark.parametrize("direction", ["read", "write"])
def test_a_failed_launch_still_waits_for_the_kernels_queued_before_it(direction):
    """CPU twin of the GPU path's failure handling: the kernels launched before a
    failing launch still run on the stream; returning (after which the engine
    releases the chunks and their slots are reused) must wait for them."""
    from types import SimpleNamespace

    pytest.importorskip("torch")
    from lmcache_core.errors import LayoutError
    from lmcache_cuda.cuda import CudaPagedKV

    kv = CudaPagedKV.__new__(CudaPagedKV)
    kv.memory = SimpleNamespace(lib=SimpleNamespace(lmc_cuda_gather="g", lmc_cuda_scatter="s"))
    kv._split = lambda chunks: ([(c, 0) for c in chunks], [])
    calls: list[tuple] = []

    def launch(fn, chunk, lo, hi, addr):
        calls.append(("launch", fn, lo))
        if len(calls) == 2:
            raise LayoutError("lmcache CUDA kernel failed (code -3) kernel launch: boom")

    kv._launch = launch
    kv._sync = lambda: calls.append(("sync",))
    buf = memoryview(bytearray(64))
    chunks = [ChunkIO(s, s + 16, buf) for s in (0, 16, 32)]
    with pytest.raises(LayoutError, match="boom"):
        (kv.read_chunks if direction == "read" else kv.write_chunks)(chunks)
    fn = "g" if direction == "read" else "s"
    assert calls == [("launch", fn, 0), ("launch", fn, 16), ("sync",)]


class _RefusingLib:
    """A CUDA library as one built for another driver behaves: every launch fails."""

    LMC_ABI_VERSION = 4

    def lmc_cuda_gather(self, *args):
        return -3

    lmc_cuda_scatter = lmc_cuda_gather

    def lmc_cuda_last_error(self):
        return _ffi.ffi().new("char[]", b"kernel launch: CUDA driver version is insufficient")


@pytest.mark.gpu
@pytest.mark.parametrize("lib", ["missing", "refusing"])
def test_unusable_cuda_kernels_fail_at_start_unless_the_torch_fallback_is_chosen(
    lib, monkeypatch, caplog
):
    """Not a silent slow path: the worker refuses to start and says what to do."""
    import logging

    import torch
    from lmcache_core.errors import LayoutError
    from lmcache_core.transfer import ChunkIO
    from lmcache_cuda import cuda
    from lmcache_cuda.reference import TorchPagedKV

    monkeypatch.setattr(_ffi, "cuda_lib", lambda: None if lib == "missing" else _RefusingLib())
    layout = KVLayout("vllm_flash", "bfloat16", 2, 2, 64, 16)
    layers = [torch.randint(1, 999, (2, 8, 16, 2, 64), dtype=torch.int16, device="cuda")
              for _ in range(2)]  # fmt: skip
    monkeypatch.delenv(cuda.FALLBACK_ENV, raising=False)
    with pytest.raises(LayoutError, match="LMCACHE_CUDA_FALLBACK=torch") as e:
        cuda.CudaPagedMemory(layout, layers)
    assert ("not built" if lib == "missing" else "driver version") in str(e.value)
    monkeypatch.setenv(cuda.FALLBACK_ENV, "torch")
    with caplog.at_level(logging.WARNING):
        mem = cuda.CudaPagedMemory(layout, layers)
    assert mem.lib is None and "much slower" in caplog.text
    got, ref = bytearray(layout.chunk_bytes(32)), bytearray(layout.chunk_bytes(32))
    mem.request([3, 5]).read_chunks([ChunkIO(0, 32, memoryview(got))])
    TorchPagedKV(layout, layers, [3, 5]).read_chunks([ChunkIO(0, 32, memoryview(ref))])
    assert got == ref  # the fallback works, slowly


def test_the_architectures_compiled_come_from_lmcache_cuda_archs(tmp_path, monkeypatch):
    """A release image lists its GPUs' architectures; a bad list says how to write one."""
    assert build.cuda_archs({}) == build.CUDA_ARCHS
    assert build.cuda_archs({"LMCACHE_CUDA_ARCHS": "80;90 100"}) == ("80", "90", "100")
    with pytest.raises(build.BuildError, match=r"without the dot, e\.g\. '80;90' \(not 9\.0\)"):
        build.cuda_archs({"LMCACHE_CUDA_ARCHS": "9.0"})
    commands = []
    monkeypatch.setattr(build, "nvcc", lambda: "/usr/local/bin/nvcc")
    monkeypatch.setattr(build, "_run", lambda cmd: commands.append(cmd))
    monkeypatch.setattr(build.os, "replace", lambda a, b: None)
    monkeypatch.setattr(build, "_stamp", lambda out, lib: None)
    monkeypatch.setenv("LMCACHE_CUDA_ARCHS", "90,100")
    build.build_cuda(tmp_path)
    (cmd,) = commands
    gencodes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-gencode"]
    assert gencodes == ["arch=compute_90,code=sm_90",
                        "arch=compute_100,code=[sm_100,compute_100]"]  # fmt: skip
