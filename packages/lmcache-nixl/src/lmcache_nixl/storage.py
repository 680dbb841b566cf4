"""``NixlStorageBackend``: a storage tier that moves chunks through NIXL's storage plugins.

``remote_url: nixl:///var/lmcache/kv.bin`` (POSIX plugin here; GDS or object
plugins where the machine has them: ``extra_config.nixl_storage_plugin``).
One preallocated file of fixed-size slots; a chunk is written from the
memory pool into its slot with one NIXL WRITE and read back with one READ,
no staging copy. Every chunk's xxh3 checksum is kept in the index and
checked after each read: a mismatch is a miss and the slot is freed.
The index lives in memory (the file is a cache that starts empty), bounded
by ``max_local_disk_size``-like ``extra_config.nixl_storage_size`` with LRU
eviction.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlparse

import xxhash
from lmcache_core.backends.base import (
    BackendCapabilities,
    BackendContext,
    ChunkAllocator,
    StorageBackend,
)
from lmcache_core.errors import ConfigError
from lmcache_core.eviction.lru import LRUPolicy
from lmcache_core.keys import CacheKey
from lmcache_core.metrics import Metrics
from lmcache_core.sizes import parse_size

from lmcache_nixl.transport import _import_nixl

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig
    from lmcache_core.pool import Chunk

logger = logging.getLogger(__name__)

_ALIGN = 4096


class _Slot:
    __slots__ = ("checksum", "index", "nbytes", "num_tokens")

    def __init__(self, index: int, nbytes: int, num_tokens: int, checksum: str) -> None:
        self.index, self.nbytes, self.num_tokens, self.checksum = (
            index,
            nbytes,
            num_tokens,
            checksum,
        )


class NixlStorageBackend(StorageBackend):
    name = "nixl"
    #: Chunks per read request (checksums of one batch overlap the next read).
    BATCH = 8
    capabilities = BackendCapabilities(evicts=True)
    extra_config_keys: ClassVar[Mapping[str, str]] = {
        "nixl_storage_size": "size of the slot file (default 10GiB)",
        "nixl_storage_plugin": "NIXL storage plugin (default POSIX; GDS or object plugins "
        "where the machine has them)",
    }

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        slot_bytes: int,
        *,
        plugin: str = "POSIX",
        metrics: Metrics | None = None,
        timeout_s: float = 10.0,
        authenticate: bool = False,
    ) -> None:
        """``authenticate``: digests are keyed MACs instead of xxh3 (see :meth:`_digest`)."""
        nixl_agent, nixl_agent_config = _import_nixl()
        self._mac_key = os.urandom(32) if authenticate else None
        self._writes = 0
        self.path = Path(path)
        self.slot_stride = -(-slot_bytes // _ALIGN) * _ALIGN
        self.num_slots = capacity_bytes // self.slot_stride
        if self.num_slots < 1:
            raise ConfigError(
                [f"nixl storage of {capacity_bytes} bytes cannot hold one {slot_bytes}-byte chunk"]
            )
        self.capacity = self.num_slots * self.slot_stride
        self.metrics = metrics if metrics is not None else Metrics()
        self.timeout_s = timeout_s
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(self.fd, self.capacity)
        except OSError as e:
            raise ConfigError(
                [f"remote_url: cannot create the NIXL storage file {self.path} ({e.strerror})"]
            ) from None
        self._name = f"lmcache-storage-{os.getpid()}-{id(self):x}"
        self.agent = nixl_agent(self._name, nixl_agent_config(backends=[plugin]))
        self.agent.register_memory([(0, self.capacity, self.fd, "")], "FILE")
        self._dram: dict[tuple[int, int], object] = {}  # (address, size) -> registration
        self._lock = threading.RLock()
        self._index: dict[CacheKey, _Slot] = {}
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._used = 0
        self.policy = LRUPolicy()

    @classmethod
    def from_config(cls, config: CacheConfig, context: BackendContext) -> NixlStorageBackend:
        assert config.remote_url is not None
        u = urlparse(config.remote_url)
        if not u.path or u.netloc:
            raise ConfigError(
                [f"remote_url={config.remote_url!r}: write a file as nixl:///path/to/kv.bin"]
            )
        extra = config.extra_config
        size = parse_size(extra.get("nixl_storage_size", "10GiB"), what="nixl_storage_size")
        return cls(
            u.path,
            size,
            context.pool.slot_bytes,
            plugin=str(extra.get("nixl_storage_plugin", "POSIX")),
            metrics=context.metrics,
            timeout_s=config.blocking_timeout_secs,
            authenticate=context.secret is not None,
        )

    def _digest(self, data: memoryview, tag: str) -> str:
        """The digest the index keeps for a slot's bytes.

        xxh3 catches damage; it does not stop someone who can write the file from
        planting other bytes with the same xxh3. With a deployment secret the
        digest is Poly1305 under a one-time key derived from a key that lives only
        in this process's memory and the write's own tag (slot and write count):
        unforgeable without reading this process's memory.
        """
        if self._mac_key is None:
            return xxhash.xxh3_64_hexdigest(data)
        import hashlib
        import hmac

        from cryptography.hazmat.primitives.poly1305 import Poly1305

        one_time = hmac.new(self._mac_key, tag.encode(), hashlib.sha256).digest()
        return f"{tag}:{Poly1305.generate_tag(one_time, data).hex()}"

    def _verify(self, data: memoryview, digest: str) -> bool:
        if self._mac_key is None:
            return xxhash.xxh3_64_hexdigest(data) == digest
        import hmac

        tag = digest.rsplit(":", 1)[0]
        return hmac.compare_digest(self._digest(data, tag), digest)

    # ------------------------------------------------------------------ moving bytes

    def _register(self, chunk: Chunk) -> None:
        arena = chunk.pool.arena
        if (arena.address, arena.size) not in self._dram:
            self._dram[arena.address, arena.size] = self.agent.register_memory(
                [(arena.address, arena.size, 0, "")], "DRAM"
            )

    def _start(self, op: str, items: list[tuple[Chunk, int]]) -> object:
        """Post one NIXL request moving each (chunk, slot) pair; returns its handle.

        Descriptors go in file order: measured, slots in descending order (as
        a free list hands them back) halve cold-read speed (no readahead).
        """
        items = sorted(items, key=lambda it: it[1])
        for c, _ in items:
            self._register(c)
        mem = self.agent.get_xfer_descs([(c.address, c.nbytes, 0) for c, _ in items], "DRAM")
        files = self.agent.get_xfer_descs(
            [(s * self.slot_stride, c.nbytes, self.fd) for c, s in items], "FILE"
        )
        handle = self.agent.initialize_xfer(op, mem, files, self._name)
        if self.agent.transfer(handle) == "ERR":
            self.agent.release_xfer_handle(handle)
            raise OSError(f"NIXL {op} failed to start")
        return handle

    def _wait(self, handle: object) -> bool:
        try:
            deadline = time.monotonic() + self.timeout_s
            state = self.agent.check_xfer_state(handle)
            while state not in ("DONE", "ERR"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"NIXL transfer timed out after {self.timeout_s} s")
                time.sleep(0)
                state = self.agent.check_xfer_state(handle)
            return state == "DONE"
        finally:
            self.agent.release_xfer_handle(handle)

    def _take_slot(self) -> int | None:
        if not self._free:
            victim = self.policy.evict(lambda k: True)
            if victim is None:
                return None
            slot = self._index.pop(victim)  # type: ignore[call-overload]
            self._used -= slot.nbytes
            self._free.append(slot.index)
            self.metrics.inc("lmcache:num_evictions", tier=self.name)
        return self._free.pop()

    # ------------------------------------------------------------------ the protocol

    def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        return [k in self._index for k in keys]

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        out = [True] * len(chunks)
        todo: list[tuple[Chunk, int]] = []
        with self._lock:
            for n, c in enumerate(chunks):
                if c.key in self._index or any(c.key == t.key for t, _ in todo):
                    continue
                if c.nbytes > self.slot_stride:
                    out[n] = False
                    continue
                slot = self._take_slot()
                if slot is None:
                    out[n] = False
                    continue
                todo.append((c, slot))
            if not todo:
                return out
            handle = self._start("WRITE", todo)
            # Checksums while the plugin writes (it releases the GIL): the bytes do not change.
            digests = []
            for c, s in todo:
                self._writes += 1
                digests.append(self._digest(c.view, f"{s}-{self._writes}"))
            if not self._wait(handle):
                self._free.extend(s for _, s in todo)
                raise OSError("NIXL storage write failed")
            for (c, s), digest in zip(todo, digests):
                self._index[c.key] = _Slot(s, c.nbytes, c.num_tokens, digest)
                self.policy.on_insert(c.key)
                self._used += c.nbytes
        if todo:
            stored = sum(c.nbytes for c, _ in todo)
            self.metrics.inc("lmcache:stored_bytes", stored, tier=self.name)
        return out

    def get(self, keys: Sequence[CacheKey], allocator: ChunkAllocator) -> list[Chunk | None]:
        out: list[Chunk | None] = [None] * len(keys)
        with self._lock:
            todo: list[tuple[int, Chunk, _Slot]] = []
            for i, k in enumerate(keys):
                slot = self._index.get(k)
                if slot is None:
                    continue
                c = allocator(k, slot.num_tokens, slot.nbytes)
                if c is None:
                    break
                self.policy.on_access(k)
                todo.append((i, c, slot))
            # Batch k is checked while batch k+1 is read.
            batches = [todo[j : j + self.BATCH] for j in range(0, len(todo), self.BATCH)]
            handle = self._start("READ", [(c, s.index) for _, c, s in batches[0]]) if todo else None
            for k, batch in enumerate(batches):
                ok = self._wait(handle)
                if k + 1 < len(batches):
                    nxt = batches[k + 1]
                    handle = self._start("READ", [(c, s.index) for _, c, s in nxt])
                for i, c, slot in batch:
                    if ok and self._verify(c.view, slot.checksum):
                        out[i] = c
                        continue
                    c.release()
                    if ok:  # a checksum failure: the slot's bytes are bad
                        self.metrics.inc("lmcache:num_corrupt_chunks", tier=self.name)
                        self._drop(keys[i])
        return out

    def _drop(self, key: CacheKey) -> bool:
        slot = self._index.pop(key, None)
        if slot is None:
            return False
        self.policy.on_remove(key)
        self._used -= slot.nbytes
        self._free.append(slot.index)
        return True

    def remove(self, keys: Sequence[CacheKey]) -> int:
        with self._lock:
            return sum(self._drop(k) for k in keys)

    def keys(self) -> Iterator[CacheKey]:
        with self._lock:
            return iter(list(self._index))

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def capacity_bytes(self) -> int:
        return self.capacity

    def close(self) -> None:
        if getattr(self, "fd", None) is None:
            return
        try:
            os.close(self.fd)
        finally:
            self.fd = None  # type: ignore[assignment]
