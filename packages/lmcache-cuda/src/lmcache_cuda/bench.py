"""Kernel benchmark: gather/scatter of one chunk against a plain copy of the same bytes.

``python tools/bench_kernels.py`` (``--json`` for machines). Ratios are
measured in one process with the rounds interleaved (baseline, kernel,
baseline, ...), median of the rounds, since these machines drift in speed.

* CPU: a 256-token chunk of a Llama-3-8B-shaped cache (32 layers, 8 KV heads,
  head size 128, bf16: 32 MiB), vLLM flash layout with 16-token blocks at
  random places in a larger cache, and vLLM's CPU layout (128-token blocks).
  Baseline: ``memcpy`` of one contiguous 32 MiB buffer (numpy ``copyto``).
  The numpy reference is measured too, for comparison.
* CUDA (with a GPU): device -> pinned host gather and host -> device scatter
  through a :class:`~lmcache_cuda.pinned.PinnedArena`, against
  ``cudaMemcpyAsync`` of one contiguous device buffer of the same size to
  (from) pinned host memory (``torch`` ``copy_`` with ``non_blocking``), for
  2 KiB rows (8 KV heads) and 256-byte rows (one head, TP8).
* Layer-wise load (``bench_layerwise``): a 4000-token cache scattered layer
  by layer as lmcache-vllm's ``use_layerwise`` does on a GPU (every layer's
  ``start_write`` queued at once on the load stream, the main stream waiting
  for layer ``i``'s event before layer ``i``'s forward) while a synthetic
  per-layer forward of about the same duration runs on the main stream;
  total time against the longer of the two alone (also with the host-thread
  loader of a connector that copies synchronously per layer).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from lmcache_core.layout import KVLayout
from lmcache_core.pool import SLOT_OFFSET
from lmcache_core.transfer import ChunkIO
from lmcache_core.transfer_numpy import NumpyPagedKV, layer_shape

from lmcache_cuda.paged import CPagedKV

LLAMA3_8B_FLASH = KVLayout("vllm_flash", "bfloat16", 32, 8, 128, 16)
LLAMA3_8B_CPU = KVLayout("vllm_cpu", "bfloat16", 32, 8, 128, 128)
#: One KV head per rank (Llama-3-8B at TP8): 256-byte rows.
LLAMA3_8B_TP8 = KVLayout("vllm_flash", "bfloat16", 32, 1, 128, 16)
#: What vLLM 0.32 hands a connector on GPUs: strided [blocks, heads, 16, K|V] views
#: in its default order (LBNHC): a token's K is 8 runs of 256 bytes, 512 bytes apart.
LLAMA3_8B_VLLM = KVLayout("vllm_bhnc", "bfloat16", 32, 8, 128, 16)
TOKENS = 256


def device_layers(layout: KVLayout, nb: int, *, fill: bool = True) -> list[Any]:
    """Per-layer CUDA KV tensors of ``layout`` (vLLM's default order for ``vllm_bhnc``)."""
    import torch

    if layout.kind.value == "vllm_bhnc":
        from lmcache_cuda.strided import strided_layers

        return strided_layers(layout, nb, device="cuda", fill=fill)[0]
    shape = layer_shape(layout, nb)
    if not fill:
        return [torch.zeros(shape, dtype=torch.int16, device="cuda")
                for _ in range(layout.num_layers)]  # fmt: skip
    return [torch.randint(1, 2**15 - 1, shape, dtype=torch.int16, device="cuda")
            for _ in range(layout.num_layers)]  # fmt: skip


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _aligned(nbytes: int) -> np.ndarray:
    """A buffer that starts half a page in, as lmcache's pool slots do."""
    raw = np.empty(nbytes + 8192, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + SLOT_OFFSET
    buf = raw[start : start + nbytes]
    buf[:] = 1
    return buf


def bench_cpu(layout: KVLayout, rounds: int = 7, reps: int = 5) -> dict[str, float]:
    nb = 4 * TOKENS // layout.block_size + 8
    rng = np.random.default_rng(0)
    layers = [
        rng.integers(1, 2**16 - 1, size=layer_shape(layout, nb), dtype=np.uint16)
        for _ in range(layout.num_layers)
    ]
    table = rng.permutation(nb)[: TOKENS // layout.block_size].tolist()
    n = layout.chunk_bytes(TOKENS)
    chunk = _aligned(n)
    other = _aligned(n)
    c_kv = CPagedKV(layout, layers, table)
    c_one = CPagedKV(layout, layers, table, threads=1)
    np_kv = NumpyPagedKV(layout, layers, table)
    io = ChunkIO(0, TOKENS, memoryview(chunk))

    def memcpy() -> None:
        np.copyto(other, chunk)

    cases = {
        "memcpy": memcpy,
        "c_gather": lambda: c_kv.read_chunks([io]),
        "c_scatter": lambda: c_kv.write_chunks([io]),
        "c1_gather": lambda: c_one.read_chunks([io]),
        "c1_scatter": lambda: c_one.write_chunks([io]),
        "numpy_gather": lambda: np_kv.read_chunks([io]),
        "numpy_scatter": lambda: np_kv.write_chunks([io]),
    }
    for fn in cases.values():  # warm: page faults, thread pools
        fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(_median_time(fn, reps))
    t = {k: statistics.median(v) for k, v in samples.items()}
    # Correctness: what the C kernel gathers equals the numpy reference.
    ref = _aligned(n)
    np_kv.read_chunks([ChunkIO(0, TOKENS, memoryview(ref))])
    c_kv.read_chunks([io])
    out = {"chunk_bytes": float(n), "memcpy_gbps": n / t["memcpy"] / 1e9}
    for k in ("c_gather", "c_scatter", "c1_gather", "c1_scatter", "numpy_gather", "numpy_scatter"):
        out[f"{k}_gbps"] = n / t[k] / 1e9
        out[f"{k}_vs_memcpy"] = t["memcpy"] / t[k]
    out["correct"] = float(bool(np.array_equal(ref, chunk)))
    return out


def bench_cuda(layout: KVLayout = LLAMA3_8B_FLASH, rounds: int = 7, reps: int = 10) -> dict:
    import torch
    from lmcache_core.pool import SlotPool

    from lmcache_cuda.cuda import CudaPagedMemory
    from lmcache_cuda.pinned import PinnedArena

    nb = 4 * TOKENS // layout.block_size + 8
    layers = device_layers(layout, nb)
    table = torch.randperm(nb)[: TOKENS // layout.block_size].tolist()
    n = layout.chunk_bytes(TOKENS)
    pool = SlotPool(PinnedArena(2 * n + SLOT_OFFSET + 4096), n)
    chunk = pool.allocate(None, TOKENS, n)  # type: ignore[arg-type]
    assert chunk is not None
    kv = CudaPagedMemory(layout, layers).request(table)
    io = ChunkIO(0, TOKENS, chunk.view)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.frombuffer(chunk.view, dtype=torch.uint8)
    stream = torch.cuda.current_stream()

    def d2h() -> None:
        host.copy_(dev, non_blocking=True)
        stream.synchronize()

    def h2d() -> None:
        dev.copy_(host, non_blocking=True)
        stream.synchronize()

    cases = {
        "memcpy_d2h": d2h,
        "memcpy_h2d": h2d,
        "cuda_gather": lambda: kv.read_chunks([io]),
        "cuda_scatter": lambda: kv.write_chunks([io]),
    }
    for fn in cases.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(_median_time(fn, reps))
    t = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "chunk_bytes": n,
        **{f"{k}_gbps": n / v / 1e9 for k, v in t.items()},
        "gather_vs_memcpy_d2h": t["memcpy_d2h"] / t["cuda_gather"],
        "scatter_vs_memcpy_h2d": t["memcpy_h2d"] / t["cuda_scatter"],
    }


def bench_layerwise(
    layout: KVLayout = LLAMA3_8B_FLASH, tokens: int = 4000, rounds: int = 5
) -> dict:
    import threading

    import torch
    from lmcache_core.pool import SlotPool

    from lmcache_cuda.cuda import CudaPagedMemory
    from lmcache_cuda.pinned import PinnedArena

    one = KVLayout(layout.kind, layout.dtype, 1, layout.num_kv_heads, layout.head_size,
                   layout.block_size)  # fmt: skip
    nb = -(-tokens // layout.block_size) + 8
    layers = device_layers(layout, nb, fill=False)
    table = torch.randperm(nb)[: -(-tokens // layout.block_size)].tolist()
    per_layer = one.chunk_bytes(tokens)  # a layer's K and V of every token, contiguous
    pool = SlotPool(PinnedArena(layout.num_layers * per_layer + SLOT_OFFSET + 4096), per_layer)
    bufs = [pool.allocate(None, tokens, per_layer) for _ in range(layout.num_layers)]  # type: ignore[arg-type]
    for b in bufs:
        b.view[:] = b"\x01" * per_layer
    kvs = [CudaPagedMemory(one, [t]).request(table) for t in layers]
    side = torch.cuda.Stream()

    def load_layer(i: int) -> None:
        with torch.cuda.stream(side):
            kvs[i].write_chunks([ChunkIO(0, tokens, bufs[i].view)])  # returns when landed

    def timed(fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    load_all = lambda: [load_layer(i) for i in range(layout.num_layers)]  # noqa: E731
    t_load = statistics.median(timed(load_all) for _ in range(3))
    # A per-layer "forward" (square matmuls) calibrated to the per-layer load time.
    x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    one_mm = statistics.median(timed(lambda: x @ x) for _ in range(5))
    reps = max(1, round(t_load / layout.num_layers / one_mm))

    def forward(i: int) -> None:
        y = x
        for _ in range(reps):
            y = y @ x

    compute_all = lambda: [forward(i) for i in range(layout.num_layers)]  # noqa: E731

    def evented() -> None:
        # What the connector does: all layers queued on the load stream now, and
        # wait_for_layer_load(i) = the main stream waits for layer i's event.
        done = [
            kvs[i].start_write([ChunkIO(0, tokens, bufs[i].view)]) for i in range(layout.num_layers)
        ]
        main = torch.cuda.current_stream()
        for i in range(layout.num_layers):
            main.wait_event(done[i].event)
            forward(i)

    def overlapped() -> None:
        ready = [threading.Event() for _ in range(layout.num_layers)]

        def loader() -> None:
            for i in range(layout.num_layers):
                load_layer(i)
                ready[i].set()

        th = threading.Thread(target=loader)
        th.start()
        for i in range(layout.num_layers):
            ready[i].wait()
            forward(i)  # queued on the main stream; the host moves on to wait for i+1
        th.join()

    samples: dict[str, list[float]] = {
        "load": [], "compute": [], "overlapped": [], "evented": []
    }  # fmt: skip
    for _ in range(rounds):
        samples["load"].append(timed(load_all))
        samples["compute"].append(timed(compute_all))
        samples["overlapped"].append(timed(overlapped))
        samples["evented"].append(timed(evented))
    t = {k: statistics.median(v) for k, v in samples.items()}
    block_dim = 1 if layout.kind.value == "vllm_flash" else 0
    ok = all(bool(torch.all(layer.index_select(block_dim, torch.tensor(table, device="cuda"))
                            != 0)) for layer in layers[:2])  # fmt: skip
    pool.close()
    return {
        "tokens": tokens,
        "bytes": layout.num_layers * per_layer,
        "load_s": t["load"],
        "compute_s": t["compute"],
        "overlapped_s": t["overlapped"],
        "overlapped_vs_longer": t["overlapped"] / max(t["load"], t["compute"]),
        "evented_s": t["evented"],
        "evented_vs_longer": t["evented"] / max(t["load"], t["compute"]),
        "serial_vs_longer": (t["load"] + t["compute"]) / max(t["load"], t["compute"]),
        "correct": float(ok),
    }


def bench_save_overhead(
    layout: KVLayout = LLAMA3_8B_VLLM, steps: int = 40, rounds: int = 5, step_ms: float = 10.0
) -> dict:
    """What saving costs a decode-step loop on the GPU (issue 15: at most 2%).

    Each step runs a synthetic forward (matmuls, about ``step_ms``) and ends by
    synchronising its stream (the sampled tokens go to the host), as vLLM's
    step does; with saves, each step also stores one 256-token chunk through
    a CacheEngine with a pinned DRAM tier: asynchronously (the gather queued
    on the save stream, committed at a later step's poll), and, for
    comparison, synchronously (the step waits for the copy).
    """
    import itertools

    import torch
    from lmcache_core.config import CacheConfig
    from lmcache_core.engine import CacheEngine
    from lmcache_core.staged_store import SaveQueue

    from lmcache_cuda.cuda import CudaPagedMemory
    from lmcache_cuda.pinned import PinnedArena

    chunk = 256
    config = CacheConfig.from_dict({"chunk_size": chunk, "max_local_cpu_size": "2GiB"})
    engine = CacheEngine(
        config,
        model="bench/save",
        layout=layout,
        arena=PinnedArena(config.max_local_cpu_size + SLOT_OFFSET),
    )
    queue = SaveQueue(engine)
    nb = chunk // layout.block_size + 8
    memory = CudaPagedMemory(layout, device_layers(layout, nb))
    table = list(range(chunk // layout.block_size))
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        x @ x
    torch.cuda.synchronize()
    reps = max(1, round(step_ms / 1e3 / ((time.perf_counter() - t0) / 20)))
    counter = itertools.count()

    def step(mode: str) -> None:
        if mode == "async":
            queue.poll()
        y = x
        for _ in range(reps):
            y = y @ x
        if mode != "none":
            n = next(counter)
            tokens = list(range(n * chunk, (n + 1) * chunk))  # a new chunk every step
            if mode == "async":
                staged = engine.store_async(tokens, memory(table))
                if staged is not None:
                    queue.add(str(n), staged)
            else:
                engine.store(tokens, memory(table))
        torch.cuda.current_stream().synchronize()

    def loop(mode: str) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(mode)
        elapsed = time.perf_counter() - t0
        queue.drain()
        return elapsed

    loop("none"), loop("async"), loop("sync")  # warm: arena pages, kernels, caches
    samples: dict[str, list[float]] = {"none": [], "async": [], "sync": []}
    for _ in range(rounds):
        for mode in samples:
            samples[mode].append(loop(mode))
    t = {k: statistics.median(v) for k, v in samples.items()}
    stored = engine.metrics.get("lmcache:num_stored_tokens")
    engine.close()
    return {
        "steps": steps,
        "step_s": t["none"] / steps,
        "chunk_bytes": layout.chunk_bytes(chunk),
        "async_vs_none": t["async"] / t["none"],
        "sync_vs_none": t["sync"] / t["none"],
        "stored_tokens": stored,
    }
