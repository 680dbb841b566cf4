"""The local disk tier: one file per chunk, written atomically, checksummed, size-bounded.

* Each chunk is a file ``<root>/<namespace>/<xx>/<key>.chunk`` holding one
  serde frame (header with key, sizes and an xxh3 checksum over all of it,
  then the payload). Writes go to a temporary name and are renamed into place,
  so a crash (``kill -9``) never leaves a torn file under a chunk's name; a
  file damaged any other way fails its checksum and is dropped: a miss.
* The index is rebuilt at start from the files on disk (names only; contents
  are verified when read), oldest first, so the tier survives restarts.
* With the raw ("naive") serde, bytes move without extra copies: ``writev`` of
  header and chunk view, ``preadv`` straight into the chunk that will serve
  the engine.
* Bounded by ``max_local_disk_size``: least recently used chunks are deleted
  to make room, after the files of namespaces no process uses any more
  (an older model, configuration or key scheme: :mod:`disk_namespaces`).
* Nothing below the configured folder is resolved by path: the tier keeps
  descriptors of the folder and of its namespace folder, opens each shard
  folder from them without following a symlink, and opens, deletes and lists
  files with ``dir_fd=`` (:mod:`chunk_files`). A symlink in place of a
  namespace or shard folder is never followed (it is replaced by a folder
  when the tier writes there), and a chunk file must be a regular file to be
  read: a FIFO in a chunk's place is a miss, not a read that waits forever.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from lmcache_core.backends.base import (
    BackendCapabilities,
    BackendContext,
    ChunkAllocator,
    StorageBackend,
)
from lmcache_core.backends.chunk_files import (
    SUFFIX,
    NotAChunkFile,
    chunk_files_at,
    drop_page_cache,
    ensure_writable_dir,
    open_dir,
    open_regular,
    open_root,
    path_from_url,
    subdir_names,
    unlink_at,
    write_atomically,
)
from lmcache_core.backends.disk_namespaces import OrphanFiles, hold
from lmcache_core.config import extra_bool
from lmcache_core.config_extra import ExtraKey
from lmcache_core.errors import ConfigError, LMCacheError
from lmcache_core.eviction.base import EvictionPolicy
from lmcache_core.eviction.lru import LRUPolicy
from lmcache_core.keys import CacheKey
from lmcache_core.metrics import Metrics
from lmcache_core.plugins import SERDES, load_plugin
from lmcache_core.serdes.base import HEADER_SIZE, ChunkHeader, Serde, SerdeError
from lmcache_core.serdes.naive import NaiveSerde

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig
    from lmcache_core.pool import Chunk

logger = logging.getLogger(__name__)

_counter = itertools.count()


class LocalDiskBackend(StorageBackend):
    name = "disk"
    capabilities = BackendCapabilities(persistent=True, evicts=True)
    inline_ops: ClassVar[frozenset[str]] = frozenset({"contains"})  # the in-memory index
    extra_config_keys: ClassVar[Mapping[str, str]] = {
        "use_odirect": ExtraKey(
            "keep chunk files out of the OS page cache (upstream's key; each file is flushed "
            "and dropped from the cache after it is written and after it is read)",
            "bool",
        ),
    }

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        serde: Serde | None = None,
        policy: EvictionPolicy | None = None,
        metrics: Metrics | None = None,
        io_threads: int = 4,
        namespace: bytes | None = None,
        max_chunk_bytes: int = 1 << 40,
        uncached: bool = False,
    ) -> None:
        self.root = Path(root)
        #: Keep chunk files out of the OS page cache (upstream's ``use_odirect``):
        #: DRAM is the CPU tier's, not a second copy of the disk tier.
        self.uncached = uncached
        #: Only this namespace's folder is indexed and cleaned: tensor-parallel
        #: ranks (and other models) sharing one ``local_disk`` never touch each
        #: other's files. None: every namespace (tools that inspect a cache).
        self.namespace = namespace
        self.max_chunk_bytes = max_chunk_bytes
        self.io_threads = io_threads
        self._io: ThreadPoolExecutor | None = None
        ensure_writable_dir(self.root, "local_disk", "choose a writable path")
        #: Descriptors of the root (""), of namespace folders ("<hex>") and of their shard
        #: folders ("<hex>/<xx>"), each opened once, never by path; closed with the tier.
        self._fds: dict[str, int] = {}
        self._fds[""] = root_fd = open_root(self.root)
        self._close_fds = weakref.finalize(self, _close_all, self._fds)
        self._root_fd = root_fd
        self.capacity = capacity_bytes
        self.serde = serde if serde is not None else NaiveSerde()
        self.policy = policy if policy is not None else LRUPolicy()
        self.metrics = metrics if metrics is not None else Metrics()
        self._lock = threading.RLock()
        #: Called with each key as it is evicted (the engine's ``watch``).
        self.on_evict: Callable[[CacheKey], None] | None = None
        self._index: dict[CacheKey, int] = {}  # key -> payload bytes
        self._used = 0
        #: Other namespaces' files that no process uses: deleted before our own chunks.
        self._orphans: OrphanFiles | None = None
        if namespace is not None:
            try:
                ns_fd = self._ns_fd(namespace.hex(), create=True)
            except OSError as e:
                raise ConfigError(
                    [
                        f"local_disk: {self.root / namespace.hex()} is not a folder "
                        f"({e.strerror}); remove it or choose another local_disk"
                    ]
                ) from None
            fd = hold(ns_fd, self.root / namespace.hex())
            if fd is not None:
                self._release = weakref.finalize(self, os.close, fd)
                self._orphans = OrphanFiles(self.root, namespace.hex(), root_fd=root_fd)
        self._rebuild_index()

    @classmethod
    def from_config(cls, config: CacheConfig, context: BackendContext) -> LocalDiskBackend:
        assert config.local_disk is not None
        serde = load_plugin(SERDES, "naive")()
        return cls(
            path_from_url(config.local_disk),
            config.max_local_disk_size,
            serde=serde,
            metrics=context.metrics,
            namespace=context.namespace,
            max_chunk_bytes=context.pool.slot_bytes,
            uncached=extra_bool(config, "use_odirect"),
        )

    # ------------------------------------------------------------------ files

    def _path(self, key: CacheKey) -> Path:
        """Where ``key``'s file is (for people and tests: the tier itself opens it by
        descriptor, :meth:`_where`)."""
        ns, shard, name = self._where(key)
        return self.root / ns / shard / name

    @staticmethod
    def _where(key: CacheKey) -> tuple[str, str, str]:
        """Namespace folder, shard folder and file name of ``key``'s chunk file."""
        return key.namespace.hex(), key.prefix.hex()[:2], f"{key.hex()}{SUFFIX}"

    def _shard_fd(self, ns: str, shard: str, *, create: bool = False) -> int:
        """The descriptor of the shard folder ``<ns>/<shard>``, opened once from the
        namespace's (never through a symlink) and kept: at most 256 per namespace."""
        fd = self._fds.get(f"{ns}/{shard}")
        if fd is None:
            ns_fd = self._ns_fd(ns, create=create)
            with self._lock:
                fd = self._fds.get(f"{ns}/{shard}")
                if fd is None:
                    fd = self._fds[f"{ns}/{shard}"] = open_dir(shard, ns_fd, create=create)
        return fd

    def _ns_fd(self, ns: str, *, create: bool = False) -> int:
        """The descriptor of the namespace folder ``ns`` (opened from the root, never through
        a symlink; ``create``: made if missing, a symlink in its place replaced)."""
        fd = self._fds.get(ns)
        if fd is None:
            with self._lock:
                fd = self._fds.get(ns)
                if fd is None:
                    fd = self._fds[ns] = open_dir(ns, self._root_fd, create=create)
        return fd

    def _namespace_names(self) -> list[str]:
        if self.namespace is not None:
            return [self.namespace.hex()]
        return subdir_names(self._root_fd)

    def _rebuild_index(self) -> None:
        """Index this namespace's chunk files, oldest first, and clear dead writers' temp files.

        Nothing is followed through a symlink, a file too large to be a chunk
        (a sparse 1 TiB file, another program's data) is deleted rather than
        counted, and a temp file is deleted only when the process that wrote
        it is gone (another process may be writing it now).
        """
        found = []
        for ns in self._namespace_names():
            try:
                ns_fd = self._ns_fd(ns)
            except OSError:
                continue  # a symlink or a file where a namespace folder would be: not ours
            for f in chunk_files_at(ns_fd):
                try:
                    key = CacheKey.from_hex(f.name[: -len(SUFFIX)])
                except ValueError:
                    continue
                if key.namespace.hex() != ns or f.shard != key.prefix.hex()[:2]:
                    continue  # a chunk's name in the wrong folder: never read there either
                nbytes = f.nbytes - HEADER_SIZE - len(key)
                if nbytes > self.max_chunk_bytes or nbytes < 0:
                    logger.warning(
                        "disk tier: %s/%s/%s is %d bytes, not a chunk of this cache; deleted",
                        ns,
                        f.shard,
                        f.name,
                        f.nbytes,
                    )
                    unlink_at(ns_fd, f.shard, f.name)
                    continue
                found.append((f.mtime, key, nbytes))
        for _, key, nbytes in sorted(found, key=lambda f: f[0]):
            self._index[key] = nbytes
            self.policy.on_insert(key)
            self._used += nbytes
        with self._lock:
            self._make_room(0)
        self._gauges()
        if found:
            logger.info("disk tier %s: %d chunks found at start", self.root, len(self._index))

    def _unlink(self, key: CacheKey) -> None:
        """Delete ``key``'s chunk file, by descriptor (a symlinked folder is not followed)."""
        ns, shard, name = self._where(key)
        try:
            shard_fd = self._shard_fd(ns, shard)
        except OSError:
            return  # no such folder (or a symlink in its place): nothing of ours there
        try:
            os.unlink(name, dir_fd=shard_fd)
        except FileNotFoundError:
            pass
        except OSError as e:  # a folder in a chunk's place: left, and logged
            logger.warning("disk tier: cannot delete %s (%s)", self._path(key), e.strerror)

    def _gauges(self) -> None:
        self.metrics.set("lmcache:usage_bytes", self._used, tier=self.name)
        self.metrics.set("lmcache:capacity_bytes", self.capacity, tier=self.name)

    def _drop(self, key: CacheKey) -> None:
        nbytes = self._index.pop(key, None)
        if nbytes is None:
            return
        self.policy.on_remove(key)
        self._used -= nbytes
        self._unlink(key)

    def _reclaim_orphans(self, need: int) -> int:
        """Delete unused namespaces' files, oldest first, to free ``need`` bytes; files deleted."""
        assert self._orphans is not None
        deleted = self._orphans.reclaim(need) if need > 0 else 0
        if deleted:
            self.metrics.inc("lmcache:num_evictions", deleted, tier=self.name)
        return deleted

    def _make_room(self, nbytes: int) -> bool:
        if self._orphans is not None:
            self._reclaim_orphans(self._used + self._orphans.nbytes + nbytes - self.capacity)
        while self._used + nbytes > self.capacity:
            victim = self.policy.evict(lambda k: True)
            if victim is None:
                return False
            size = self._index.pop(victim)  # type: ignore[call-overload]
            self._used -= size
            self._unlink(victim)  # type: ignore[arg-type]
            self.metrics.inc("lmcache:num_evictions", tier=self.name)
            if self.on_evict is not None:
                self.on_evict(victim)
        return True

    # ------------------------------------------------------------------ protocol

    def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        index = self._index
        return [k in index for k in keys]

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        out = [True] * len(chunks)
        todo = []
        for i, chunk in enumerate(chunks):
            if chunk.key in self._index:
                continue
            if chunk.nbytes > self.capacity:
                out[i] = False
                continue
            todo.append(i)
        if todo and self._orphans is not None:
            self._orphans.scan()  # at most once a minute, off the tier's lock
        if todo:
            # Evict before writing, so the files of evicted chunks free the space the
            # new ones need (it matters when the filesystem, not the bound, is full).
            with self._lock:
                self._make_room(sum(chunks[i].nbytes for i in todo))
        errors: list[OSError | None] = list(self._map(self._try_write, [chunks[i] for i in todo]))
        for i, err in zip(todo, errors):
            chunk = chunks[i]
            if err is not None:
                out[i] = False
                continue
            with self._lock:
                if chunk.key in self._index:  # another thread won the race: same content
                    continue
                if not self._make_room(chunk.nbytes):
                    self._unlink(chunk.key)
                    out[i] = False
                    continue
                self._index[chunk.key] = chunk.nbytes
                self.policy.on_insert(chunk.key)
                self._used += chunk.nbytes
                self._gauges()
            self.metrics.inc("lmcache:stored_bytes", chunk.nbytes, tier=self.name)
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            if failed.errno in (errno.ENOSPC, errno.EDQUOT):
                self._shrink_to_fit()
            # Raised, not swallowed: the tier's health marks writes unhealthy
            # (skipped, retried with backoff) instead of failing every write.
            raise failed
        return out

    def _try_write(self, chunk: Chunk) -> OSError | None:
        try:
            self._write(chunk)
        except OSError as e:
            return e
        return None

    def _map(self, fn, items: list):  # type: ignore[no-untyped-def]
        """``map`` on the I/O threads when there is more than one item.

        A chunk's read or write overlaps another's checksum: measured, this
        is what brings the tier to the disk's sequential speed.
        """
        if len(items) <= 1 or self.io_threads <= 1:
            return map(fn, items)
        if self._io is None:
            with self._lock:
                if self._io is None:
                    self._io = ThreadPoolExecutor(
                        self.io_threads, thread_name_prefix="lmcache-disk"
                    )
        return self._io.map(fn, items)

    def _shrink_to_fit(self) -> None:
        """The filesystem is full before our bound: lower the bound to what we hold.

        Eviction then makes room for each new chunk, so the tier keeps working
        inside the space the filesystem really has (until a restart re-reads
        ``max_local_disk_size``). Unused namespaces' files go first: space
        they free is not a reason to lower the bound.
        """
        with self._lock:
            if self._orphans is not None and self._reclaim_orphans(self._orphans.nbytes):
                return
            target = max(0, self._used - self._used // 8)  # leave headroom for the next writes
            if target < self.capacity:
                logger.warning(
                    "disk tier %s: filesystem full at %d bytes of chunks; lowering the bound "
                    "from %d to %d bytes",
                    self.root,
                    self._used,
                    self.capacity,
                    target,
                )
                self.capacity = target
                self._make_room(0)
                self._gauges()

    def _write(self, chunk: Chunk) -> None:
        ns, shard, name = self._where(chunk.key)
        parts = self.serde.encode(chunk.key.to_bytes(), chunk.num_tokens, chunk.view)
        shard_fd = self._shard_fd(ns, shard, create=True)
        tag = f"{os.getpid()}-{next(_counter)}"
        write_atomically(name, tag, parts, uncached=self.uncached, dir_fd=shard_fd)

    def get(self, keys: Sequence[CacheKey], allocator: ChunkAllocator) -> list[Chunk | None]:
        out: list[Chunk | None] = [None] * len(keys)
        todo: list[tuple[int, CacheKey, int]] = []
        with self._lock:
            for i, key in enumerate(keys):
                nbytes = self._index.get(key)
                if nbytes is not None:
                    self.policy.on_access(key)
                    todo.append((i, key, nbytes))
        got = self._map(lambda t: self._read(t[1], t[2], allocator), todo)
        for (i, _, _), chunk in zip(todo, got):
            out[i] = chunk
        return out

    def _open(self, key: CacheKey) -> int:
        """``key``'s chunk file, opened by descriptor from the namespace folder down: never
        through a symlink, and only a regular file (:func:`open_regular`)."""
        ns, shard, name = self._where(key)
        return open_regular(name, self._shard_fd(ns, shard))

    def _read(self, key: CacheKey, nbytes: int, allocator: ChunkAllocator) -> Chunk | None:
        path = self._path(key)
        try:
            fd = self._open(key)
        except OSError as e:  # gone, or a symlink, a FIFO or a folder in a chunk's place
            if isinstance(e, NotAChunkFile):
                logger.warning("disk tier: chunk %s unreadable (%s); dropped", path.name, e)
            if not isinstance(e, FileNotFoundError):
                self.metrics.inc("lmcache:num_corrupt_chunks", tier=self.name)
            with self._lock:
                self._drop(key)
            return None
        chunk = None
        try:
            kb = key.to_bytes()
            hsize = HEADER_SIZE + len(kb)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SerdeError("not a regular file")
            if st.st_size != hsize + nbytes and isinstance(self.serde, NaiveSerde):
                raise SerdeError("file length does not match its index entry")
            if nbytes > self.max_chunk_bytes:
                raise SerdeError(f"{nbytes} bytes do not fit a chunk of {self.max_chunk_bytes}")
            # The payload goes straight into the chunk that will serve the engine.
            # (Header and payload in one preadv would save a syscall, but measured
            # at half the speed: the kernel copies to the misaligned destination slowly.)
            chunk = allocator(key, 0, nbytes)
            if chunk is None:
                return None  # no memory to read into: a miss, not an error
            if isinstance(self.serde, NaiveSerde):
                header = ChunkHeader.unpack(os.pread(fd, hsize, 0), max_raw_nbytes=nbytes)
                if header.key != kb or header.raw_nbytes != nbytes:
                    raise SerdeError("file holds another chunk")
                got = os.preadv(fd, [chunk.view], hsize)
                if got != nbytes or header.serde_id != NaiveSerde.serde_id:
                    raise SerdeError("file length does not match its header")
                header.verify(chunk.view)
                chunk.num_tokens = header.num_tokens
                if self.uncached:
                    drop_page_cache(fd, written=False)
            else:
                if st.st_size > hsize + nbytes + nbytes // 64 + 4096:
                    raise SerdeError("file is larger than any frame of its chunk")
                frame = os.pread(fd, st.st_size, 0)
                chunk.num_tokens = self.serde.decode(frame, kb, chunk.view)
            self.metrics.inc("lmcache:retrieved_bytes", nbytes, tier=self.name)
            return chunk
        except (LMCacheError, OSError) as e:  # SerdeError, ChunkTooLargeError, I/O
            logger.warning("disk tier: chunk %s unreadable (%s); dropped", path.name, e)
            self.metrics.inc("lmcache:num_corrupt_chunks", tier=self.name)
            if chunk is not None:
                chunk.release()
            with self._lock:
                self._drop(key)
            return None
        finally:
            os.close(fd)

    def remove(self, keys: Sequence[CacheKey]) -> int:
        n = 0
        with self._lock:
            for key in keys:
                if key in self._index:
                    self._drop(key)
                    n += 1
            self._gauges()
        return n

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
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        release = getattr(self, "_release", None)
        if release is not None:
            release()  # this namespace may now be reclaimed by other tiers on the folder
        if self._orphans is not None:
            self._orphans.close()
        self._root_fd = -1  # its number may be reused: never open anything from it again
        self._close_fds()
        # The files stay: that is the point.


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
