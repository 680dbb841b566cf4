"""``LMCacheHiCacheStorage``: lmcache as the storage layer (L3) of SGLang's HiCache.

SGLang loads it with::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name": "lmcache", "module_path": "lmcache_sglang",
        "class_name": "LMCacheHiCacheStorage", "interface_v1": 1}'

and constructs it with ``(storage_config, kwargs)``. The cache config is the
one every engine reads (``LMCACHE_CONFIG_FILE``, ``LMCACHE_*``); keys of the
extra config other than SGLang's own are overrides, as ``kv_connector_extra_config``
is for vLLM.

Mapping: one SGLang page is one lmcache chunk. SGLang names pages by its own
chained page hash; the chunk key is that hash in a namespace of model, layout,
page size and TP rank/size, so ranks and models never mix. Pages move between
SGLang's host pool (``register_mem_pool_host``) and lmcache's arena with
lmcache-cuda's C kernels, one copy each way, straight from/into the host pool
(the v1 interface); the tiers below DRAM (disk, Redis, S3, ...) are the same
as under vLLM.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any

import torch
from lmcache_core.adapter_kit import CacheInstance, config_overrides, open_cache
from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.errors import ConfigError, LayoutError
from lmcache_core.keys import CacheKey, ChunkSpan
from lmcache_core.layout import KVLayout
from lmcache_core.transfer import ChunkIO
from lmcache_cuda.paged import CPagedMemory, Planes
from lmcache_cuda.torch_dtypes import TORCH_DTYPES
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

logger = logging.getLogger(__name__)

#: Keys of SGLang's ``--hicache-storage-backend-extra-config`` that are not cache config keys.
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1", "model_id"})


def load_cache_config(extra: dict[str, Any] | None) -> CacheConfig:
    """The cache config: file and ``LMCACHE_*`` variables, then SGLang's extra config."""
    return CacheConfig.load(overrides=config_overrides(extra, adapter_keys=SGLANG_KEYS))


def host_pool_layout(pool: Any, *, is_mla: bool) -> tuple[KVLayout, Planes]:
    """lmcache's description of an SGLang host KV pool (``MHATokenToKVPoolHost`` or MLA)."""
    buf = pool.kv_buffer
    dtype = TORCH_DTYPES.get(buf.dtype)
    if dtype is None:
        raise LayoutError(f"SGLang host pool dtype {buf.dtype} is not supported")
    es = buf.element_size()
    ps, nl, size = int(pool.page_size), int(pool.layer_num), int(pool.size)
    base = int(buf.data_ptr())
    kind = pool.layout
    if is_mla:
        d = int(buf.shape[-1])
        row = d * es
        layout = KVLayout("mla", dtype, nl, 1, d, ps)
        if kind == "layer_first":  # [layers, size, 1, dim]
            bases = tuple(base + ly * size * row for ly in range(nl))
            return layout, Planes(bases, ps * row, row, row, ps, size // ps)
        if kind == "page_first":  # [size, layers, 1, dim]
            bases = tuple(base + ly * row for ly in range(nl))
            return layout, Planes(bases, ps * nl * row, nl * row, row, ps, size // ps)
        raise LayoutError(f"SGLang MLA host layout {kind!r} is not supported by lmcache yet")
    heads, hd = int(pool.head_num), int(pool.head_dim)
    row = heads * hd * es
    layout = KVLayout("sglang_token", dtype, nl, heads, hd, ps)
    if kind == "layer_first":  # [2, layers, size, heads, dim]
        bases = tuple(base + (p * nl + ly) * size * row for ly in range(nl) for p in (0, 1))
        return layout, Planes(bases, ps * row, row, row, ps, size // ps)
    if kind == "page_first":  # [2, size, layers, heads, dim]
        bases = tuple(base + p * size * nl * row + ly * row for ly in range(nl) for p in (0, 1))
        return layout, Planes(bases, ps * nl * row, nl * row, row, ps, size // ps)
    if kind == "page_first_direct":  # [2, pages, layers, page, heads, dim]
        pages = size // ps
        bases = tuple(
            base + p * pages * nl * ps * row + ly * ps * row for ly in range(nl) for p in (0, 1)
        )
        return layout, Planes(bases, nl * ps * row, row, row, ps, pages)
    raise LayoutError(
        f"SGLang host layout {kind!r} splits a token's heads; use --hicache-mem-layout "
        "layer_first, page_first or page_first_direct with lmcache"
    )


class LMCacheHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        self.config = load_cache_config(extra)
        self.model = str(extra.get("model_id") or storage_config.model_name or "")
        if not self.model:
            raise ConfigError(
                [
                    "SGLang gave no model name; set model_id in the "
                    "--hicache-storage-backend-extra-config JSON"
                ],
                "lmcache-sglang",
            )
        self.is_mla = bool(storage_config.is_mla_model)
        # MLA ranks hold the same KV: one writer per shard (SGLang's rule).
        self.writer = bool(storage_config.is_storage_writer)
        self.engine: CacheEngine | None = None
        #: Folded into every page key; a clear() starts a new one.
        self._epoch = b""
        self.memory: CPagedMemory | None = None
        self.page_size = 0
        self.cache: CacheInstance | None = None
        if kwargs and isinstance(kwargs, dict) and kwargs.get("mem_pool_host") is not None:
            self.register_mem_pool_host(kwargs["mem_pool_host"])

    # ------------------------------------------------------------------ set-up

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        layout, planes = host_pool_layout(mem_pool_host, is_mla=self.is_mla)
        self.page_size = layout.block_size
        if self.config.chunk_size != self.page_size:
            logger.info(
                "lmcache: under SGLang a chunk is one page of %d tokens (chunk_size=%d applies "
                "to vLLM)",
                self.page_size,
                self.config.chunk_size,
            )
        sc = self.storage_config
        world = max(1, int(sc.tp_size))
        rank = int(sc.tp_rank)
        if self.is_mla:  # replicas share the writer's keys
            rank = int(getattr(sc, "dcp_rank", 0))
            world = max(1, int(getattr(sc, "dcp_size", 1)))
        if self.cache is not None:  # a second host pool: the cache is rebuilt for it
            self.cache.close()
        # In this process, or on the host's lmcache server (server_url). SGLang has no
        # connector metrics API: lmcache's own exporter, one port per rank.
        self.cache = open_cache(
            self.config.replace(chunk_size=self.page_size),
            model=self.model,
            layout=layout,
            world_size=world,
            rank=rank,
            exporter_rank=int(sc.tp_rank),
            client_info={"engine": "sglang"},
        )
        self.engine = self.cache.engine
        self.memory = CPagedMemory(layout, planes=planes, keepalive=[mem_pool_host.kv_buffer])
        logger.info(
            "lmcache: SGLang rank %d/%d, %s pages of %d tokens, tiers: %s",
            rank,
            world,
            layout.kind.value,
            self.page_size,
            ", ".join(self.engine.chunk_store.tier_names),
        )

    def _require(self) -> CacheEngine:
        if self.engine is None:
            raise RuntimeError("register_mem_pool_host() must come before storage calls")
        return self.engine

    # ------------------------------------------------------------------ keys and pages

    def cache_key(self, key: str) -> CacheKey:
        if not isinstance(key, str) or not key:
            raise ValueError(f"SGLang page key must be a non-empty string, got {key!r}")
        engine = self._require()
        return CacheKey.of(
            engine.namespace.digest, hashlib.sha256(self._epoch + key.encode()).digest()
        )

    def _pages(self, host_indices: Any, n: int) -> list[int] | None:
        """Page ids of ``n`` pages given by token indices (one page each, page-aligned)."""
        ps = self.page_size
        idx = torch.as_tensor(host_indices).flatten().tolist()
        if len(idx) != n * ps:
            logger.warning("lmcache: %d host indices for %d pages of %d", len(idx), n, ps)
            return None
        pages = []
        for i in range(n):
            first = idx[i * ps]
            if first % ps or idx[i * ps : (i + 1) * ps] != list(range(first, first + ps)):
                logger.warning("lmcache: host indices of page %d are not one aligned page", i)
                return None
            pages.append(first // ps)
        return pages

    def _spans(self, n: int) -> list[ChunkSpan]:
        ps = self.page_size
        return [ChunkSpan(i * ps, (i + 1) * ps, b"") for i in range(n)]

    # ------------------------------------------------------------------ v1: host pool direct

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        if not keys:
            return 0
        return self._require().prefix_present([self.cache_key(k) for k in keys])

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_set_v1(
        self, keys: list[str], host_indices: Any, extra_info: Any = None
    ) -> list[bool]:
        engine = self._require()
        if not keys:
            return []
        if not self.writer:
            return [True] * len(keys)  # another rank writes this shard
        pages = self._pages(host_indices, len(keys))
        if pages is None:
            return [False] * len(keys)
        ckeys = [self.cache_key(k) for k in keys]
        assert self.memory is not None
        engine.store_chunks(ckeys, self._spans(len(keys)), self.memory.request(pages))
        return engine.present(ckeys)

    def batch_get_v1(
        self, keys: list[str], host_indices: Any, extra_info: Any = None
    ) -> list[bool]:
        engine = self._require()
        if not keys:
            return []
        pages = self._pages(host_indices, len(keys))
        if pages is None:
            return [False] * len(keys)
        assert self.memory is not None
        got = engine.retrieve_chunks(
            [self.cache_key(k) for k in keys], self._spans(len(keys)), self.memory.request(pages)
        )
        return [True] * got + [False] * (len(keys) - got)

    # ------------------------------------------------------------------ legacy: flat data pages

    def _page_to_chunk(self, page: torch.Tensor) -> torch.Tensor:
        """SGLang's flat data page -> lmcache's chunk bytes (layer, K/V, tokens)."""
        pool = self.mem_pool_host
        ps, nl = self.page_size, int(pool.layer_num)
        raw = page.contiguous().view(torch.uint8)
        if self.is_mla:
            if pool.layout == "layer_first":  # [layers, page, 1, dim]
                return raw
            return raw.view(ps, nl, -1).transpose(0, 1).contiguous().flatten()
        if pool.layout == "layer_first":  # [2, layers, page, heads, dim]
            return raw.view(2, nl, -1).transpose(0, 1).contiguous().flatten()
        if pool.layout == "page_first":  # [2, page, layers, heads, dim]
            return raw.view(2, ps, nl, -1).permute(2, 0, 1, 3).contiguous().flatten()
        # page_first_direct: [2, 1, layers, page, heads, dim]
        return raw.view(2, nl, -1).transpose(0, 1).contiguous().flatten()

    def _chunk_to_page(self, chunk: torch.Tensor) -> torch.Tensor:
        pool = self.mem_pool_host
        ps, nl = self.page_size, int(pool.layer_num)
        if self.is_mla:
            if pool.layout == "layer_first":
                return chunk
            return chunk.view(nl, ps, -1).transpose(0, 1).contiguous().flatten()
        if pool.layout == "page_first":
            return chunk.view(nl, 2, ps, -1).permute(1, 2, 0, 3).contiguous().flatten()
        return chunk.view(nl, 2, -1).transpose(0, 1).contiguous().flatten()

    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool:
        if value is None:
            return False
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any = None,
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        engine = self._require()
        if values is None or len(values) != len(keys):
            return False
        if not self.writer or not keys:
            return True
        want = engine.layout.chunk_bytes(self.page_size)
        for v in values:
            got = v.numel() * v.element_size()
            if got != want:
                logger.warning("lmcache: a data page of %d bytes, the pool's are %d", got, want)
                return False
        chunks = [self._page_to_chunk(v) for v in values]
        ckeys = [self.cache_key(k) for k in keys]
        engine.store_chunks(ckeys, self._spans(len(keys)), _TensorChunks(chunks, self.page_size))
        return all(engine.present(ckeys))

    def get(
        self, key: str, target_location: Any = None, target_sizes: Any = None
    ) -> torch.Tensor | None:
        out = self.batch_get([key], [target_location] if target_location is not None else None)
        return out[0] if out else None

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        engine = self._require()
        if not keys:
            return []
        n = engine.layout.chunk_bytes(self.page_size)
        bufs = [torch.empty(n, dtype=torch.uint8) for _ in keys]
        got = engine.retrieve_chunks(
            [self.cache_key(k) for k in keys],
            self._spans(len(keys)),
            _TensorChunks(bufs, self.page_size),
        )
        out: list[torch.Tensor | None] = []
        dtype = self.mem_pool_host.kv_buffer.dtype
        for i in range(len(keys)):
            if i >= got:
                out.append(None)
                continue
            page = self._chunk_to_page(bufs[i]).view(dtype)
            if target_locations is not None and target_locations[i] is not None:
                target_locations[i].view(-1).view(torch.uint8).copy_(page.view(torch.uint8))
                out.append(target_locations[i])
            else:
                out.append(page)
        return out

    # ------------------------------------------------------------------ the rest

    def clear(self) -> None:
        """SGLang's ``clear_storage_backend`` (an operator's "forget what is stored", e.g.
        after new weights): DRAM is emptied, and keys start a new epoch, so nothing stored
        before in any tier is read by this instance again (shared tiers belong to every
        instance and cannot be emptied for all; what is left ages out by eviction)."""
        self._epoch = secrets.token_bytes(16)
        # On a server, DRAM is every engine's: the new epoch alone hides the old chunks.
        if self.engine is not None and self.engine.cpu is not None:
            self.engine.cpu.remove(list(self.engine.cpu.keys()))
        logger.info("lmcache: storage cleared by SGLang; keys start a new epoch")

    def get_stats(self) -> dict[str, float]:
        if self.engine is None:
            return {}
        m = self.engine.metrics
        return {
            name.split(":", 1)[1]: m.get(name)
            for name in (
                "lmcache:num_stored_tokens",
                "lmcache:num_hit_tokens",
                "lmcache:num_failures",
            )
        }

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()  # the exporter, then the engine
            self.cache = None
        self.engine = None


class _TensorChunks:
    """Reader/writer over chunk-format byte tensors, one per chunk (the legacy calls)."""

    def __init__(self, chunks: list[torch.Tensor], page_size: int) -> None:
        self.chunks = chunks
        self.page_size = page_size

    def read_chunks(self, ios: list[ChunkIO]) -> None:
        for io in ios:  # the engine skips chunks it holds: find each by its tokens
            src = self.chunks[io.start // self.page_size]
            torch.frombuffer(io.buffer, dtype=torch.uint8).copy_(src)

    def write_chunks(self, ios: list[ChunkIO]) -> None:
        for io in ios:
            dst = self.chunks[io.start // self.page_size]
            dst.copy_(torch.frombuffer(io.buffer, dtype=torch.uint8))
