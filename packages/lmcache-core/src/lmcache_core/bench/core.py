"""The core benchmark: CPU-tier store/retrieve against memcpy, and lookup cost.

Run it as ``lmcache bench core`` or ``python tools/bench_core.py``. Every figure
is a ratio against a baseline measured in the same process, seconds apart,
because these machines drift in speed from minute to minute.

* store / retrieve: a Llama-3-8B-shaped KV cache (32 layers, 8 KV heads,
  head size 128, bf16, vLLM flash layout with 16-token blocks scattered at
  random), 256-token chunks of 32 MiB, stored into and retrieved from the
  CPU tier through :class:`~lmcache_core.engine.CacheEngine` with the best host
  transfer (lmcache-cuda's C kernels when installed, else numpy). Baseline:
  one contiguous memcpy of the same bytes.
* lookup: hashing and probing a 128K-token prompt whose chunks are all cached,
  from a Python list of ints (what an engine holds).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.layout import KVLayout
from lmcache_core.transfer import ChunkIO
from lmcache_core.transfer_numpy import host_transfer, layer_shape

LLAMA3_8B = KVLayout(
    kind="vllm_flash",
    dtype="bfloat16",
    num_layers=32,
    num_kv_heads=8,
    head_size=128,
    block_size=16,
)


@dataclass
class CoreBenchResult:
    chunk_bytes: int
    chunks: int
    memcpy_s: float
    store_s: float
    retrieve_s: float
    lookup_ms: dict[str, float]
    correct: bool

    @property
    def store_ratio(self) -> float:
        return self.memcpy_s / self.store_s

    @property
    def retrieve_ratio(self) -> float:
        return self.memcpy_s / self.retrieve_s

    def gbps(self, seconds: float) -> float:
        return self.chunk_bytes * self.chunks / seconds / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {
            "chunk_bytes": self.chunk_bytes,
            "chunks": self.chunks,
            "memcpy_GBps": round(self.gbps(self.memcpy_s), 2),
            "store_GBps": round(self.gbps(self.store_s), 2),
            "retrieve_GBps": round(self.gbps(self.retrieve_s), 2),
            "store_vs_memcpy": round(self.store_ratio, 3),
            "retrieve_vs_memcpy": round(self.retrieve_ratio, 3),
            "lookup_128k_ms": {k: round(v, 3) for k, v in self.lookup_ms.items()},
            "bytes_equal": self.correct,
        }


@dataclass
class EngineMemory:
    """An engine's KV for ``chunks`` chunks (random bytes, blocks in random places), an
    empty twin to load into, their reader and writer, and a memcpy baseline's buffers."""

    src: list[Any]
    dst: list[Any]
    reader: Any
    writer: Any
    base_src: Any
    base_dst: Any

    @classmethod
    def make(cls, layout: KVLayout, chunks: int, chunk_size: int) -> EngineMemory:
        num_blocks = chunks * (chunk_size // layout.block_size)
        rng = np.random.default_rng(0)
        src = [
            rng.integers(1, 2**16, size=layer_shape(layout, num_blocks), dtype=np.uint16)
            for _ in range(layout.num_layers)
        ]
        dst = [np.zeros_like(a) for a in src]
        table = rng.permutation(num_blocks)
        total = chunks * layout.chunk_bytes(chunk_size)
        return cls(
            src,
            dst,
            host_transfer(layout, src, table),
            host_transfer(layout, dst, table),
            np.frombuffer(rng.bytes(total), dtype=np.uint8).copy(),
            np.ones(total, dtype=np.uint8),
        )


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_core_benchmark(
    chunks: int = 16,
    rounds: int = 6,
    layout: KVLayout = LLAMA3_8B,
    chunk_size: int = 256,
    on_step: Callable[[str], None] | None = None,
    server_url: str | None = None,
) -> CoreBenchResult:
    """``server_url``: store into and retrieve from that ``lmcache server``'s shared arena
    (MP mode) instead of this process's DRAM tier; the baseline is the same memcpy."""
    step = on_step or (lambda _msg: None)
    chunk_bytes = layout.chunk_bytes(chunk_size)
    step("allocating engine memory")
    mem = EngineMemory.make(layout, chunks, chunk_size)
    src, dst, reader, writer = mem.src, mem.dst, mem.reader, mem.writer
    base_src, base_dst = mem.base_src, mem.base_dst
    config = CacheConfig.from_dict(
        {"chunk_size": chunk_size, "max_local_cpu_size": f"{2 * chunks * chunk_bytes}B"}
    )
    engine = _engine(config, layout, server_url)
    ntok = chunks * chunk_size

    store_t, retrieve_t, memcpy_t = [], [], []
    correct = True
    try:
        for r in range(rounds + 1):  # round 0 warms up (page faults in the arena)
            step(f"round {r}/{rounds}")
            tokens = list(range(r * ntok, (r + 1) * ntok))
            t0 = time.perf_counter()
            stored = engine.store(tokens, reader)
            t1 = time.perf_counter()
            got = engine.retrieve(tokens, writer)
            t2 = time.perf_counter()
            np.copyto(base_dst, base_src)
            t3 = time.perf_counter()
            if stored != ntok or got != ntok:
                raise RuntimeError(f"benchmark stored {stored} and retrieved {got} of {ntok}")
            if r == 0:
                correct = all(np.array_equal(a, b) for a, b in zip(src, dst))
                continue
            store_t.append(t1 - t0)
            retrieve_t.append(t2 - t1)
            memcpy_t.append(t3 - t2)
    finally:
        engine.close()

    step("lookup of a 128K-token prompt")
    lookup_ms = _lookup_benchmark()
    return CoreBenchResult(
        chunk_bytes=chunk_bytes,
        chunks=chunks,
        memcpy_s=statistics.median(memcpy_t),
        store_s=statistics.median(store_t),
        retrieve_s=statistics.median(retrieve_t),
        lookup_ms=lookup_ms,
        correct=correct,
    )


def _engine(config: CacheConfig, layout: KVLayout, server_url: str | None) -> CacheEngine:
    if server_url is None:
        return CacheEngine(config, model="bench/llama-3-8b", layout=layout)
    from lmcache_core.mp.address import parse_server_url
    from lmcache_core.mp.client import ServerChunkStore

    def factory(ns: Any, metrics: Any) -> ServerChunkStore:
        return ServerChunkStore(parse_server_url(server_url), ns, metrics=metrics)

    engine = CacheEngine(config, model="bench/llama-3-8b", layout=layout, store_factory=factory)
    if not getattr(engine.chunk_store, "connected", False):
        engine.close()
        raise RuntimeError(f"no lmcache server answered at {server_url}")
    return engine


class _NullReader:
    def read_chunks(self, chunks: list[ChunkIO]) -> None:
        for c in chunks:
            c.buffer[:8] = b"lmcache!"


def _lookup_benchmark(num_tokens: int = 128 * 1024) -> dict[str, float]:
    """Median milliseconds to look up a fully cached 128K-token prompt.

    ``list_to_bytes`` is the floor for a Python list of ints: converting it
    to bytes, which any key scheme must do, measured in the same run.
    """
    import array

    tiny = KVLayout(
        kind="vllm_flash",
        dtype="bfloat16",
        num_layers=1,
        num_kv_heads=1,
        head_size=8,
        block_size=16,
    )
    as_array = np.random.default_rng(1).integers(0, 128_000, size=num_tokens, dtype=np.uint32)
    tokens = as_array.tolist()
    out: dict[str, float] = {}
    for algo in ("sha256", "xxh3_128"):
        config = CacheConfig.from_dict(
            {"chunk_size": 256, "max_local_cpu_size": "64MiB", "hash_algorithm": algo}
        )
        with CacheEngine(config, model="bench/lookup", layout=tiny) as engine:
            engine.store(tokens, _NullReader())
            assert engine.lookup(tokens) == num_tokens
            out[f"{algo}, list input"] = _median_time(lambda e=engine: e.lookup(tokens), 40) * 1e3
            if algo == "sha256":
                out[f"{algo}, numpy input"] = (
                    _median_time(lambda e=engine: e.lookup(as_array), 40) * 1e3
                )
    out["list_to_bytes (floor)"] = _median_time(lambda: array.array("I", tokens), 40) * 1e3
    return out
