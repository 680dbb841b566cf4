"""The shared filesystem tier (``remote_url: fs:///mnt/shared/lmcache``), for NFS-style mounts.

Unlike the local disk tier, many instances write here, so nothing is kept in
an in-memory index: ``contains`` asks the filesystem. Each chunk is one file
holding a checksummed frame, written under a temporary name unique to this
host and process and renamed into place, so a reader on any host sees a
whole file or none. The store is bounded by whoever runs the share (quota,
a cleanup job): lmcache deletes only files that fail their checksum.

Files are reached from a descriptor of the root, each folder opened with
``O_NOFOLLOW`` (:mod:`chunk_files`): a symlink that another host (or user) of
the share puts in place of a folder or a chunk is never followed, so nothing
is read, written or deleted outside the share. A chunk file is opened only
once it is a regular file, with ``O_NONBLOCK``: a FIFO there is a miss, never a
read that waits forever.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import stat
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lmcache_core.auth import FrameSealer
from lmcache_core.backends.base import BackendCapabilities, BackendContext
from lmcache_core.backends.chunk_files import (
    SUFFIX,
    ensure_writable_dir,
    open_dir,
    open_regular,
    open_root,
    subdir_names,
    write_atomically,
)
from lmcache_core.backends.frame_store import (
    FrameParts,
    FrameStore,
    Oversized,
    Unusable,
)
from lmcache_core.errors import ConfigError
from lmcache_core.keys import CacheKey
from lmcache_core.metrics import Metrics
from lmcache_core.serdes.base import Serde

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig

logger = logging.getLogger(__name__)
_counter = itertools.count()


def fs_path(url: str) -> Path:
    u = urlparse(url)
    if u.scheme != "fs" or not u.path or (u.path == "/" and not u.netloc):
        raise ConfigError([f"remote_url={url!r}: write a shared directory as fs:///mnt/shared/dir"])
    if u.netloc:
        raise ConfigError(
            [f"remote_url={url!r}: fs:// takes a local mount path (fs:///path), not a host"]
        )
    return Path(u.path)


class SharedFSBackend(FrameStore):
    name = "fs"
    capabilities = BackendCapabilities(persistent=True, shared=True, exact_usage=False)

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        serde: Serde | None = None,
        metrics: Metrics | None = None,
        max_chunk_bytes: int = 1 << 31,
        sealer: FrameSealer | None = None,
    ) -> None:
        super().__init__(
            serde=serde, metrics=metrics, max_chunk_bytes=max_chunk_bytes, sealer=sealer
        )
        self.root = Path(root)
        ensure_writable_dir(self.root, "remote_url", "is the share mounted and writable?")
        #: Everything below the root is opened from this descriptor (never by path).
        self._root_fd = open_root(self.root)
        self._close_root = weakref.finalize(self, os.close, self._root_fd)
        self._tag = f"{socket.gethostname()}-{os.getpid()}"

    @classmethod
    def from_config(cls, config: CacheConfig, context: BackendContext) -> SharedFSBackend:
        assert config.remote_url is not None
        return cls(fs_path(config.remote_url), **cls.common_kwargs(config, context))

    def name_of(self, key: CacheKey) -> str:
        h = key.hex()
        return f"{key.namespace.hex()}/{key.prefix.hex()[:2]}/{h}{SUFFIX}"

    def key_of(self, name: str) -> CacheKey | None:
        base = name.rsplit("/", 1)[-1]
        if not base.endswith(SUFFIX):
            return None
        try:
            return CacheKey.from_hex(base[: -len(SUFFIX)])
        except ValueError:
            return None

    @staticmethod
    def _parts(name: str) -> tuple[str, str, str] | None:
        """``<namespace>/<shard>/<file>`` of a chunk's name; None for anything else."""
        parts = name.split("/")
        if len(parts) != 3 or any(p in ("", ".", "..") for p in parts):
            return None
        return parts[0], parts[1], parts[2]

    def _shard_fd(self, name: str, *, create: bool = False) -> tuple[int, str] | None:
        """The shard folder of ``name`` (opened from the root, no symlink followed) and the
        file's name in it; None when the folder is not there (or is not a folder)."""
        parts = self._parts(name)
        if parts is None:
            return None
        ns, shard, base = parts
        try:
            ns_fd = open_dir(ns, self._root_fd, create=create)
        except (FileNotFoundError, NotADirectoryError):
            if create:
                raise
            return None
        try:
            return open_dir(shard, ns_fd, create=create), base
        except (FileNotFoundError, NotADirectoryError):
            if create:
                raise
            return None
        finally:
            os.close(ns_fd)

    def _read(
        self, names: list[str], limit: int
    ) -> list[bytes | memoryview | Oversized | Unusable | None]:
        return [self._read_one(name, limit) for name in names]

    def _read_one(self, name: str, limit: int) -> bytes | Oversized | Unusable | None:
        """The file's bytes, its size checked before one is read; never through a symlink,
        and only from a regular file (a FIFO or a device in its place is never waited on)."""
        at = self._shard_fd(name)
        if at is None:
            return None
        shard_fd, base = at
        try:
            fd = open_regular(base, shard_fd)
        except FileNotFoundError:
            return None
        except OSError as e:  # NotAChunkFile: a symlink, FIFO or folder in a chunk's place
            return Unusable(str(e) or type(e).__name__)  # a miss for it alone, deleted
        finally:
            os.close(shard_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return Unusable("not a regular file")
            if st.st_size > limit:
                return Oversized(st.st_size)
            buf = bytearray(st.st_size)
            view, got = memoryview(buf), 0
            while got < st.st_size:
                n = os.readv(fd, [view[got:]])
                if n == 0:
                    break  # truncated meanwhile: the frame check will refuse it
                got += n
            return bytes(buf[:got]) if got < st.st_size else bytes(buf)
        finally:
            os.close(fd)

    def _write(self, items: list[tuple[str, FrameParts]]) -> list[bool]:
        out = []
        for name, parts in items:
            at = self._shard_fd(name, create=True)
            if at is None:
                raise ValueError(f"{name!r} is not a chunk's name in this store")
            shard_fd, base = at
            try:
                if not self._present(base, shard_fd):
                    tag = f"{self._tag}-{next(_counter)}"
                    # Readable by the other hosts' processes; synced before it is visible.
                    write_atomically(base, tag, parts, durable=True, mode=0o644, dir_fd=shard_fd)
                out.append(True)
            except IsADirectoryError:  # a folder in the chunk's place: this chunk only
                logger.warning("fs tier: %s is a folder, not a chunk; not written", name)
                out.append(False)
            finally:
                os.close(shard_fd)
        return out

    @staticmethod
    def _present(base: str, shard_fd: int) -> bool:
        """A chunk file is there (anything else in its place is replaced by the write)."""
        try:
            st = os.stat(base, dir_fd=shard_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode)

    def _exists(self, names: list[str]) -> list[bool]:
        out = []
        for name in names:
            at = self._shard_fd(name)
            if at is None:
                out.append(False)
                continue
            shard_fd, base = at
            try:
                st = os.stat(base, dir_fd=shard_fd, follow_symlinks=False)
                out.append(stat.S_ISREG(st.st_mode))
            except OSError:
                out.append(False)
            finally:
                os.close(shard_fd)
        return out

    def _delete(self, names: list[str]) -> int:
        n = 0
        for name in names:
            at = self._shard_fd(name)
            if at is None:
                continue
            shard_fd, base = at
            try:
                os.unlink(base, dir_fd=shard_fd)
                n += 1
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                # A folder in a chunk's place: removed when empty; never a tree (a
                # shared store's folder is not this instance's to delete whole).
                try:
                    os.rmdir(base, dir_fd=shard_fd)
                    n += 1
                except OSError as e:
                    logger.warning("fs tier: %s is a folder, not a chunk; left (%s)", name,
                                   e.strerror)  # fmt: skip
            finally:
                os.close(shard_fd)
        return n

    def _names(self) -> Iterator[str]:
        root_fd = self._root_fd
        for ns in subdir_names(root_fd):
            try:
                ns_fd = open_dir(ns, root_fd)
            except OSError:
                continue
            try:
                for shard in subdir_names(ns_fd):
                    try:
                        shard_fd = open_dir(shard, ns_fd)
                    except OSError:
                        continue
                    try:
                        with os.scandir(shard_fd) as it:
                            found = [
                                e.name
                                for e in it
                                if e.name.endswith(SUFFIX) and not e.name.startswith(".")
                            ]
                    finally:
                        os.close(shard_fd)
                    for base in found:
                        yield f"{ns}/{shard}/{base}"
            finally:
                os.close(ns_fd)

    @property
    def capacity_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize
