"""The server's core benchmark: store and load through the shared arena, against memcpy
and against the in-process DRAM tier, interleaved round by round in one process.

Why interleaved: these machines drift in speed from minute to minute (2x seen),
so each round measures a memcpy of the same bytes, an in-process store and
load, and a store and load through a real ``lmcache server`` process, back to
back; the figures are medians of per-round ratios.

Shape: a Llama-3-8B KV cache (32 layers, 8 KV heads, head size 128, bf16,
16-token blocks scattered at random), 256-token chunks of 32 MiB, with the best
host transfer installed (lmcache-cuda's C kernels, else numpy), as
``lmcache bench core``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from lmcache_core.bench.core import LLAMA3_8B, EngineMemory
from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.layout import KVLayout
from lmcache_core.mp.address import parse_server_url
from lmcache_core.mp.client import ServerChunkStore

from lmcache_server.testing import ServerProcess


@dataclass
class ServerCoreResult:
    chunk_bytes: int
    chunks: int
    rounds: int
    #: per round: seconds of memcpy, local store, local load, server store, server load
    times: dict[str, list[float]] = field(default_factory=dict)
    correct: bool = True

    def ratio(self, name: str) -> float:
        """Median over rounds of memcpy's time / ``name``'s time (1.0: memcpy speed)."""
        return statistics.median(m / t for m, t in zip(self.times["memcpy"], self.times[name]))

    def gbps(self, name: str) -> float:
        return self.chunk_bytes * self.chunks / statistics.median(self.times[name]) / 1e9

    def as_dict(self) -> dict[str, Any]:
        names = ["memcpy", "local_store", "local_load", "server_store", "server_load"]
        return {
            "chunk_bytes": self.chunk_bytes,
            "chunks": self.chunks,
            "rounds": self.rounds,
            "GBps": {n: round(self.gbps(n), 2) for n in names},
            "vs_memcpy": {n: round(self.ratio(n), 3) for n in names[1:]},
            "server_vs_local": {
                "store": round(self.ratio("server_store") / self.ratio("local_store"), 3),
                "load": round(self.ratio("server_load") / self.ratio("local_load"), 3),
            },
            "bytes_equal": self.correct,
        }


def run_server_core_benchmark(
    chunks: int = 16,
    rounds: int = 10,
    layout: KVLayout = LLAMA3_8B,
    chunk_size: int = 256,
    on_step: Callable[[str], None] | None = None,
) -> ServerCoreResult:
    step = on_step or (lambda _msg: None)
    chunk_bytes = layout.chunk_bytes(chunk_size)
    arena = f"{2 * chunks * chunk_bytes}B"
    step("allocating engine memory")
    mem = EngineMemory.make(layout, chunks, chunk_size)
    src, dst, reader, writer = mem.src, mem.dst, mem.reader, mem.writer
    base_src, base_dst = mem.base_src, mem.base_dst
    ntok = chunks * chunk_size
    config = CacheConfig.from_dict({"chunk_size": chunk_size, "max_local_cpu_size": arena})
    result = ServerCoreResult(chunk_bytes, chunks, rounds)
    times: dict[str, list[float]] = {
        k: [] for k in ("memcpy", "local_store", "local_load", "server_store", "server_load")
    }
    step("starting an lmcache server")
    with ServerProcess({"chunk_size": chunk_size, "max_local_cpu_size": arena}) as server:

        def factory(ns: Any, metrics: Any) -> ServerChunkStore:
            return ServerChunkStore(parse_server_url(server.url), ns, metrics=metrics)

        local = CacheEngine(config, model="bench/llama-3-8b", layout=layout)
        remote = CacheEngine(config, model="bench/llama-3-8b", layout=layout,
                             store_factory=factory)  # fmt: skip
        try:
            if not getattr(remote.chunk_store, "connected", False):
                raise RuntimeError(f"the lmcache server did not answer:\n{server.log()}")
            for r in range(rounds + 1):  # round 0 warms up
                step(f"round {r}/{rounds}")
                tokens = list(range(r * ntok, (r + 1) * ntok))
                for name, engine in (("local", local), ("server", remote)):
                    t0 = time.perf_counter()
                    stored = engine.store(tokens, reader)
                    t1 = time.perf_counter()
                    got = engine.retrieve(tokens, writer)
                    t2 = time.perf_counter()
                    if stored != ntok or got != ntok:
                        raise RuntimeError(f"{name}: stored {stored}, loaded {got} of {ntok}")
                    if r == 0:
                        result.correct &= all(np.array_equal(a, b) for a, b in zip(src, dst))
                        for d in dst:
                            d.fill(0)
                    else:
                        times[f"{name}_store"].append(t1 - t0)
                        times[f"{name}_load"].append(t2 - t1)
                t0 = time.perf_counter()
                np.copyto(base_dst, base_src)
                if r:
                    times["memcpy"].append(time.perf_counter() - t0)
        finally:
            local.close()
            remote.close()
    result.times = times
    return result
