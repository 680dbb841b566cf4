"""One cache config serves every engine: vLLM's and SGLang's adapters read the same file
and build the same tiers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("sglang.srt.mem_cache.hicache_storage")

from lmcache_core.engine import CacheEngine
from lmcache_core.layout import KVLayout
from lmcache_core.testing.servers import RedisServer
from lmcache_sglang import LMCacheHiCacheStorage
from lmcache_sglang.storage import load_cache_config as sglang_config
from lmcache_vllm.settings import load_cache_config as vllm_config
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig


class Pool:
    layout, page_size, layer_num, size, head_num, head_dim = "layer_first", 16, 2, 64, 2, 8

    def __init__(self):
        self.kv_buffer = torch.zeros(2, 2, 64, 2, 8, dtype=torch.bfloat16)


def test_one_config_file_builds_the_same_tiers_under_vllm_and_sglang(tmp_path, monkeypatch):
    with RedisServer() as redis:
        cfg = tmp_path / "lmcache.yaml"
        cfg.write_text(
            f"chunk_size: 256\nmax_local_cpu_size: 64MiB\nlocal_disk: file://{tmp_path}/disk\n"
            f"max_local_disk_size: 1GiB\nremote_url: {redis.url}\nremote_serde: lz4\n"
        )
        monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(cfg))
        # A shared tier (Redis) needs the deployment secret: from the environment, as
        # in production, the same for both engines.
        monkeypatch.setenv("LMCACHE_AUTH_SECRET", "one-config-two-engines-secret-0123456789")
        v = vllm_config({"model_id": "m"})  # kv_connector_extra_config
        s = sglang_config({"backend_name": "lmcache", "module_path": "lmcache_sglang",
                           "class_name": "LMCacheHiCacheStorage", "interface_v1": 1})  # fmt: skip
        assert v == s

        vllm_engine = CacheEngine(
            v, model="m", layout=KVLayout("vllm_flash", "bfloat16", 2, 2, 8, 16)
        )
        sc = HiCacheStorageConfig(
            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
            is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
            model_name="m", extra_config={"backend_name": "lmcache"},
        )  # fmt: skip
        sglang = LMCacheHiCacheStorage(sc, {})
        sglang.register_mem_pool_host(Pool())

        def describe(engine):
            return [
                (t.name, getattr(getattr(t, "backend", t), "serde", None).__class__.__name__)
                for t in engine.tiers
            ]

        assert [t.name for t in vllm_engine.tiers] == ["cpu", "disk", "redis"]
        assert describe(sglang.engine) == describe(vllm_engine)
        vllm_engine.close()
        sglang.close()
