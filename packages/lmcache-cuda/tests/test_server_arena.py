"""The engine's kernels copy KV straight into and out of an lmcache server's arena.

In MP mode a worker maps the server's shared arena; on a GPU it pins that
mapping (``pin_server_arena``: ``cudaHostRegister``) so the CUDA kernels DMA
into the server's slots as into the in-process pinned arena. The GPU test runs
that path; its CPU twin runs the same round trip with the C kernels (what
vLLM's CPU backend uses).
"""

from __future__ import annotations

import os

import pytest
from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.layout import KVLayout

server_mod = pytest.importorskip("lmcache_server")


def _round_trip(layout: KVLayout, device: str, on_map) -> tuple[bytes, bytes, object]:
    import torch
    from lmcache_core.mp.address import parse_server_url
    from lmcache_core.mp.client import ServerChunkStore
    from lmcache_cuda import paged_memory
    from lmcache_cuda.strided import strided_layers
    from lmcache_server.testing import private_dir

    sock = os.path.join(private_dir(), "s.sock")
    config = CacheConfig.from_dict({"chunk_size": 64, "max_local_cpu_size": "64MiB"})
    srv = server_mod.CacheServer(config, socket_path=sock)
    try:

        def factory(ns, metrics):
            return ServerChunkStore(parse_server_url(f"unix://{sock}"), ns, metrics=metrics,
                                    on_map=on_map)  # fmt: skip

        engine = CacheEngine(config, model="gpu/model", layout=layout, store_factory=factory)
        views, _buf = strided_layers(layout, 32, device=device, seed=3)
        mem = paged_memory(layout, views)
        tokens = list(range(256))
        src_blocks, dst_blocks = list(range(16)), list(range(31, 15, -1))
        assert engine.store(tokens, mem(src_blocks)) == 256
        assert engine.retrieve(tokens, mem(dst_blocks)) == 256
        if device == "cuda":
            torch.cuda.synchronize()
        bs = layout.block_size

        def blocks_bytes(blocks):
            n = 256 // bs
            return b"".join(
                v[b].contiguous().view(torch.int16).cpu().numpy().tobytes()
                for v in views
                for b in blocks[:n]
            )

        got = (blocks_bytes(src_blocks), blocks_bytes(dst_blocks), engine.chunk_store)
        engine.close()
        return got
    finally:
        srv.close(1.0)


def test_c_kernels_copy_between_cpu_kv_and_the_server_arena():
    pytest.importorskip("torch")
    layout = KVLayout("vllm_bhnc", "bfloat16", 2, 2, 64, 16)
    src, dst, _ = _round_trip(layout, "cpu", None)
    assert src == dst


@pytest.mark.gpu
def test_cuda_kernels_copy_between_gpu_kv_and_the_pinned_server_arena():
    from lmcache_cuda.pinned import is_pinned, pin_server_arena

    pinned = {}

    def on_map(mapping):
        handle = pin_server_arena(mapping)
        pinned["ok"] = handle is not None and is_pinned(mapping.address, mapping.size)
        return handle

    layout = KVLayout("vllm_bhnc", "bfloat16", 2, 2, 64, 16)
    src, dst, _ = _round_trip(layout, "cuda", on_map)
    assert pinned.get("ok"), "the server's arena was not registered with CUDA"
    assert src == dst
