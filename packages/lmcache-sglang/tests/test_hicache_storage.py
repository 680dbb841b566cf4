"""lmcache behind SGLang's real HiCacheStorage interface (SGLang 0.5, imported on the CPU).

SGLang's host pool classes cannot be built here (their import chain needs
torchvision, which breaks the CPU torch, and CUDA for pinned registration), so
``HostPool`` below is a test double that allocates ``kv_buffer`` exactly as
``MHATokenToKVPoolHost.init_kv_buffer`` / the MLA pool do, and reads pages as
their ``get_data_page`` does. Everything else is SGLang's own code.
"""

from __future__ import annotations

import uuid

import pytest
import torch

hs = pytest.importorskip("sglang.srt.mem_cache.hicache_storage")
from lmcache_core.errors import ConfigError  # noqa: E402
from lmcache_core.testing.servers import RedisServer  # noqa: E402
from lmcache_sglang import LMCacheHiCacheStorage  # noqa: E402
from lmcache_sglang.storage import host_pool_layout  # noqa: E402

HiCacheStorage = hs.HiCacheStorage
HiCacheStorageConfig = hs.HiCacheStorageConfig


class HostPool:
    """SGLang's host KV pool memory (MHA or MLA), as its classes allocate it."""

    def __init__(self, layout="layer_first", *, mla=False, layers=3, heads=2, dim=8, page=4,
                 size=64, dtype=torch.bfloat16, seed=0):  # fmt: skip
        self.layout, self.page_size, self.layer_num, self.size = layout, page, layers, size
        self.head_num, self.head_dim, self.dtype, self.mla = heads, dim, dtype, mla
        pages = size // page
        if mla:
            dims = {"layer_first": (layers, size, 1, dim), "page_first": (size, layers, 1, dim)}
        else:
            dims = {
                "layer_first": (2, layers, size, heads, dim),
                "page_first": (2, size, layers, heads, dim),
                "page_first_direct": (2, pages, layers, page, heads, dim),
                "page_head": (2, pages, heads, page, layers, dim),
            }
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer = (
            torch.randint(1, 2**15, dims[layout], dtype=torch.int16, generator=g).view(dtype)
            if dtype.itemsize == 2
            else torch.randint(1, 255, dims[layout], dtype=torch.uint8, generator=g).view(dtype)
        )

    def get_data_page(self, index, flat=True):
        """As SGLang: the page starting at token index ``index``."""
        ps = self.page_size
        if self.mla:
            page = (
                self.kv_buffer[:, index : index + ps]
                if self.layout == "layer_first"
                else self.kv_buffer[index : index + ps]
            )
        elif self.layout == "layer_first":
            page = self.kv_buffer[:, :, index : index + ps]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index : index + ps]
        else:
            page = self.kv_buffer[:, index // ps : index // ps + 1]
        return page.flatten() if flat else page

    def token_kv(self, index):
        """Every layer's K and V of one token, layout-independent (for comparisons)."""
        b = self.kv_buffer
        if self.mla:
            return (b[:, index] if self.layout == "layer_first" else b[index]).flatten()
        if self.layout == "layer_first":
            return b[:, :, index].flatten()
        if self.layout == "page_first":
            return b[:, index].flatten()
        ps = self.page_size
        return b[:, index // ps, :, index % ps].flatten()


def storage_config(**kw):
    base = dict(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
        model_name="test/model", extra_config={"max_local_cpu_size": "64MiB"},
    )  # fmt: skip
    base.update(kw)
    return HiCacheStorageConfig(**base)


def backend(pool, **kw) -> LMCacheHiCacheStorage:
    b = LMCacheHiCacheStorage(storage_config(is_mla_model=pool.mla, **kw), {})
    b.register_mem_pool_host(pool)
    return b


def page_indices(pages, ps):
    return torch.tensor([p * ps + i for p in pages for i in range(ps)], dtype=torch.int64)


def keys(n, tag="a"):
    return [f"{tag}-page-{i}" for i in range(n)]


def test_it_is_a_real_hicache_storage_built_as_sglang_builds_dynamic_backends():
    assert issubclass(LMCacheHiCacheStorage, HiCacheStorage)
    b = LMCacheHiCacheStorage(storage_config(), {})  # (storage_config, kwargs), as SGLang does
    with pytest.raises(RuntimeError, match="register_mem_pool_host"):
        b.batch_exists(["k"])


LAYOUTS = [
    ("layer_first", False, torch.bfloat16),
    ("page_first", False, torch.float16),
    ("page_first_direct", False, torch.bfloat16),
    ("layer_first", True, torch.bfloat16),
    ("page_first", True, torch.uint8),  # fp8 caches move as bytes
]


@pytest.mark.parametrize("layout, mla, dtype", LAYOUTS)
def test_v1_pages_round_trip_between_host_pools_byte_for_byte(layout, mla, dtype):
    src = HostPool(layout, mla=mla, dtype=dtype, seed=1)
    dst = HostPool(layout, mla=mla, dtype=dtype, seed=2)
    a = backend(src)
    b = LMCacheHiCacheStorage(storage_config(is_mla_model=mla), {})
    b.register_mem_pool_host(dst)
    b.engine = a.engine  # the same cache (one process, two pools)
    ps = src.page_size
    ks = keys(3)
    assert a.batch_set_v1(ks, page_indices([5, 1, 9], ps)) == [True, True, True]
    assert a.batch_exists(ks) == 3 and a.exists(ks[1])
    assert b.batch_get_v1(ks, page_indices([2, 14, 7], ps)) == [True, True, True]
    for sp, dp in zip([5, 1, 9], [2, 14, 7]):
        for i in range(ps):
            assert torch.equal(
                src.token_kv(sp * ps + i).view(torch.uint8),
                dst.token_kv(dp * ps + i).view(torch.uint8),
            )
    # An untouched page of the destination stays as it was.
    fresh = HostPool(layout, mla=mla, dtype=dtype, seed=2)
    assert torch.equal(dst.token_kv(0).view(torch.uint8), fresh.token_kv(0).view(torch.uint8))


def test_exists_is_a_prefix_and_missing_pages_are_false():
    pool = HostPool()
    b = backend(pool)
    ks = keys(4)
    b.batch_set_v1(ks[:2], page_indices([0, 1], 4))
    b.batch_set_v1(ks[3:], page_indices([3], 4))
    assert b.batch_exists(ks) == 2
    assert not b.exists("never-stored")
    assert b.batch_get_v1(ks, page_indices([4, 5, 6, 7], 4)) == [True, True, False, False]
    assert b.batch_get_v1([], torch.tensor([], dtype=torch.int64)) == []


def test_legacy_flat_page_calls_agree_with_the_host_pool_layout():
    for layout in ("layer_first", "page_first"):
        pool = HostPool(layout, seed=3)
        b = backend(pool)
        page = pool.get_data_page(8).clone()
        assert b.set("legacy-0", page)
        got = b.get("legacy-0")
        assert torch.equal(got.view(torch.uint8), page.view(torch.uint8))
        # What set() stored is what a v1 get writes into the pool.
        other = HostPool(layout, seed=4)
        b2 = LMCacheHiCacheStorage(storage_config(), {})
        b2.register_mem_pool_host(other)
        b2.engine = b.engine
        assert b2.batch_get_v1(["legacy-0"], page_indices([5], 4)) == [True]
        assert torch.equal(other.get_data_page(20).view(torch.uint8), page.view(torch.uint8))
        target = torch.empty_like(page)
        assert b.batch_get(["legacy-0", "absent"], [target, None])[1] is None
        assert torch.equal(target.view(torch.uint8), page.view(torch.uint8))
        assert not b.batch_set(["x"], [page[:-1]])  # wrong size: refused


#: The deployment secret a production setup of a shared tier has (it refuses to start without).
SECRET = "sglang-hicache-test-secret-0123456789abcdef"


@pytest.fixture
def deployment_secret(monkeypatch):
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", SECRET)


def with_redis(url: str) -> dict:
    """Extra config: 64 MiB of DRAM over Redis, under a key prefix of this test's own."""
    return {
        "max_local_cpu_size": "64MiB",
        "remote_url": url,
        "extra_config": {"redis_key_prefix": f"t-{uuid.uuid4().hex[:6]}:"},
    }


def test_tp_ranks_and_models_are_kept_apart_in_a_shared_tier(deployment_secret):
    with RedisServer() as redis:
        extra = with_redis(redis.url)
        pool = HostPool()
        r0 = backend(pool, tp_rank=0, tp_size=2, extra_config=extra)
        r1 = backend(HostPool(), tp_rank=1, tp_size=2, extra_config=extra)
        other_model = backend(HostPool(), tp_rank=0, tp_size=2, extra_config=extra,
                              model_name="other/model")  # fmt: skip
        ks = keys(2)
        r0.batch_set_v1(ks, page_indices([0, 1], 4))
        assert r0.engine.flush(10)
        assert r1.batch_exists(ks) == 0
        assert other_model.batch_exists(ks) == 0
        # A new rank-0 process (empty DRAM) finds them in Redis.
        again = backend(HostPool(), tp_rank=0, tp_size=2, extra_config=extra)
        assert again.batch_exists(ks) == 2
        assert again.batch_get_v1(ks, page_indices([7, 8], 4)) == [True, True]
        assert torch.equal(again.mem_pool_host.token_kv(28), pool.token_kv(0))


def test_clear_means_nothing_stored_before_is_read_again_from_any_tier(deployment_secret):
    """SGLang's clear_storage_backend: DRAM empties, and what Redis holds from before is no
    longer read by this instance (it was: only DRAM was emptied)."""
    with RedisServer() as redis:
        extra = with_redis(redis.url)
        pool = HostPool()
        b = backend(pool, extra_config=extra)
        ks = keys(2, "clear")
        b.batch_set_v1(ks, page_indices([0, 1], 4))
        assert b.engine.flush(10) and b.batch_exists(ks) == 2
        b.clear()
        assert len(list(b.engine.cpu.keys())) == 0
        assert b.batch_exists(ks) == 0
        assert b.batch_get_v1(ks, page_indices([7, 8], 4)) == [False, False]
        # Stored again after the clear: found again.
        b.batch_set_v1(ks, page_indices([2, 3], 4))
        assert b.batch_exists(ks) == 2


def test_mla_replicas_write_once():
    pool = HostPool(mla=True)
    reader = backend(pool, tp_rank=1, tp_size=2)
    assert not reader.writer
    assert reader.batch_set_v1(keys(1), page_indices([0], 4)) == [True]
    assert reader.batch_exists(keys(1)) == 0  # nothing written by the non-writer


def test_bad_input_is_refused_clearly():
    b = backend(HostPool())
    with pytest.raises(ValueError, match="non-empty string"):
        b.batch_exists([""])
    misaligned = torch.arange(2, 6)
    assert b.batch_set_v1(["k"], misaligned) == [False]
    assert b.batch_set_v1(["k", "l"], page_indices([0], 4)) == [False, False]  # too few indices
    assert b.batch_get_v1(["k"], misaligned) == [False]
    with pytest.raises(Exception, match="splits a token's heads"):
        backend(HostPool("page_head"))
    with pytest.raises(ConfigError, match="model_id"):
        LMCacheHiCacheStorage(storage_config(model_name=None), {})
    with pytest.raises(ConfigError, match="chunk_sise"):
        LMCacheHiCacheStorage(storage_config(extra_config={"chunk_sise": 5}), {})


def test_layout_description_matches_the_pool():
    layout, planes = host_pool_layout(HostPool("page_first"), is_mla=False)
    assert layout.kind.value == "sglang_token" and layout.block_size == 4
    assert planes.row_stride == 3 * planes.row_bytes  # tokens interleave the layers
    assert len(planes.bases) == 6


# --------------------------------------------------------------------------- the shipped contract

from lmcache_core.testing import StorageBackendTests  # noqa: E402
from lmcache_core.testing.scratch import scratch_dir  # noqa: E402
from lmcache_core.testing.settled import SettledWrites  # noqa: E402


class TestDiskTierAsTheSGLangBackendBuildsIt(StorageBackendTests):
    """lmcache-core's storage contract on the disk tier that LMCacheHiCacheStorage builds.

    This checks the tier (its config, namespace and slot bound as the SGLang
    backend sets them up), not the SGLang interface itself: that is tested
    above through SGLang's own calls (``batch_set_v1``/``batch_get_v1``, ...).
    Chunks are one engine slot at most (a page here), as the backend stores them.
    """

    slot_bytes = 4096

    def make_backend(self, capacity_bytes, slot_bytes):

        extra = {
            "max_local_cpu_size": "64MiB",
            "local_disk": str(scratch_dir()),
            "max_local_disk_size": f"{capacity_bytes}B",
        }
        b = backend(HostPool(), extra_config=extra)
        disk = b.engine.tiers[1]
        assert disk.name == "disk"
        assert b.engine.pool.slot_bytes == slot_bytes, "the suite's chunks must fit a slot"
        return SettledWrites(disk, on_close=b.close)


def test_sglang_exposes_lmcache_metrics_on_its_exporter():
    """SGLang has no connector metrics API: metrics_port starts lmcache's exporter per rank."""
    from lmcache_core.bench.scrape import scrape_metrics
    from lmcache_core.testing.servers import free_port

    port = free_port()
    extra = {"max_local_cpu_size": "64MiB", "metrics_port": port, "metrics_host": "127.0.0.1"}
    b = backend(HostPool(), extra_config=extra)
    try:
        ks = keys(2, "metrics")
        b.batch_set_v1(ks, page_indices([0, 1], 4))
        assert b.batch_get_v1(ks, page_indices([2, 3], 4)) == [True, True]
        m = scrape_metrics(f"http://127.0.0.1:{port}/metrics")
        assert m["lmcache:num_hit_tokens"] == 8 == b.get_stats()["num_hit_tokens"]
        assert m["lmcache:stored_bytes"] > 0
        assert m["lmcache:time_to_store_count"] >= 1
    finally:
        b.close()


def test_two_sglang_instances_share_one_lmcache_server_byte_for_byte():
    """MP mode under SGLang: ``server_url`` in the same extra config (or cache YAML) puts
    the pages on the host's ``lmcache server``; a second instance reads the first's."""
    server_mod = pytest.importorskip("lmcache_server")
    import os

    from lmcache_core.config import CacheConfig
    from lmcache_server.testing import private_dir

    sock = os.path.join(private_dir(), "lmcache.sock")
    srv = server_mod.CacheServer(
        CacheConfig.from_dict({"max_local_cpu_size": "8MiB"}), socket_path=sock
    )
    extra = {"max_local_cpu_size": "64MiB", "server_url": f"unix://{sock}"}
    try:
        src, dst = HostPool(seed=1), HostPool(seed=2)
        a = backend(src, extra_config=extra)
        b = backend(dst, extra_config=extra)
        assert a.engine.chunk_store.tier_names == ["server:cpu"]
        ps = src.page_size
        ks = keys(3, "mp")
        assert a.batch_set_v1(ks, page_indices([5, 1, 9], ps)) == [True, True, True]
        assert b.batch_exists(ks) == 3  # the other instance sees them
        assert b.batch_get_v1(ks, page_indices([2, 14, 7], ps)) == [True, True, True]
        for sp, dp in zip([5, 1, 9], [2, 14, 7]):
            for i in range(ps):
                assert torch.equal(
                    src.token_kv(sp * ps + i).view(torch.uint8),
                    dst.token_kv(dp * ps + i).view(torch.uint8),
                )
        status = srv.status()
        assert len(status["sessions"]) == 2 and len(status["namespaces"]) == 1
        a.close()
        b.close()
    finally:
        srv.close(1.0)
