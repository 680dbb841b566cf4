"""Engines of two kinds on one ``lmcache server``: two vLLM OpenAI servers and an SGLang
storage client, with one cache config (MP mode, real processes).

Here, not in an adapter's tests: it uses both adapters, and neither adapter's
package may import the other (tests included).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("lmcache_server")
pytestmark = pytest.mark.slow

from lmcache_core.bench.scrape import scrape_metrics  # noqa: E402
from lmcache_server.testing import ServerProcess  # noqa: E402
from lmcache_vllm.testing import complete, vllm_server  # noqa: E402
from lmcache_vllm.testing.models import ensure_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = {"chunk_size": 256, "max_local_cpu_size": "256MiB"}
PROMPT = " ".join(f"shared{i} document words" for i in range(120))  # ~600 tokens


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    """The vLLM adapter's tests' random 4-layer Llama (the same folder, made once)."""
    return ensure_model(ROOT / ".cache" / "test-models" / "tiny", preset="tiny")


def vllm_env() -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}


def external_hits(port: int) -> float:
    m = scrape_metrics(f"http://127.0.0.1:{port}/metrics", prefix="vllm:")
    return m.get("vllm:external_prefix_cache_hits", 0.0)


def test_two_vllm_servers_share_one_lmcache_server(tiny_model, tmp_path):
    with ServerProcess(CACHE) as server:
        extra = {"server_url": server.url}
        with vllm_server(tiny_model, "kv_both", vllm_env(), tmp_path / "a.log",
                         extra_config=extra) as a:  # fmt: skip
            first = complete(a, PROMPT, max_tokens=8)
            assert external_hits(a) == 0
            _an_sglang_client_shares_it(server.url)
            with vllm_server(tiny_model, "kv_both", vllm_env(), tmp_path / "b.log",
                             extra_config=extra) as b:  # fmt: skip
                second = complete(b, PROMPT, max_tokens=8)
                hits = external_hits(b)
    assert second == first
    assert hits >= 512  # b loaded what a stored: no p2p tier, one server
    assert "tiers: server:cpu" in (tmp_path / "b.log").read_text()


def _an_sglang_client_shares_it(url: str) -> None:
    """SGLang's storage interface on the same server, with the same cache config."""
    hs = pytest.importorskip("sglang.srt.mem_cache.hicache_storage")
    import torch
    from lmcache_sglang import LMCacheHiCacheStorage

    class Pool:  # SGLang's layer-first host pool memory
        layout, page_size, layer_num, size, head_num, head_dim = "layer_first", 16, 2, 64, 2, 8

        def __init__(self, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.kv_buffer = torch.randint(1, 2**15, (2, 2, 64, 2, 8), dtype=torch.int16,
                                           generator=g).view(torch.bfloat16)  # fmt: skip

    def storage(pool: Pool) -> LMCacheHiCacheStorage:
        sc = hs.HiCacheStorageConfig(
            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
            is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
            model_name="sglang/model", extra_config={**CACHE, "server_url": url},
        )  # fmt: skip
        s = LMCacheHiCacheStorage(sc, {})
        s.register_mem_pool_host(pool)
        return s

    src, dst = Pool(1), Pool(2)
    a, b = storage(src), storage(dst)
    pages = torch.arange(0, 32)  # two pages of 16 tokens
    assert a.batch_set_v1(["p0", "p1"], pages) == [True, True]
    assert b.batch_get_v1(["p0", "p1"], torch.arange(32, 64)) == [True, True]
    as_bits = torch.int16  # random bits include NaNs in bf16: compare the bytes
    assert torch.equal(
        src.kv_buffer.view(as_bits)[:, :, :32], dst.kv_buffer.view(as_bits)[:, :, 32:64]
    )
    models = {n["model"] for n in a.engine.chunk_store.status()["namespaces"]}
    assert "sglang/model" in models and len(models) == 2  # vLLM's namespace and SGLang's
    a.close()
    b.close()
