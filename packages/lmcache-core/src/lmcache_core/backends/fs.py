"""The shared filesystem tier (``remote_url: fs:///mnt/shared/lmcache``), for NFS-style mounts.

Unlike the local disk tier, many instances write here, so nothing is kept in
an in-memory index: ``contains`` asks the filesystem. Each chunk is one file
holding a checksummed frame, written under a temporary name unique to this
host and process and renamed into place, so a reader on any host sees a
whole file or none. The store is bounded by whoever runs the share (quota,
a cleanup job): lmcache deletes only files that fail their checksum.
"""

from __future__ import annotations

import itertools
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lmcache_core.auth import FrameSealer
from lmcache_core.backends.base import BackendCapabilities, BackendContext
from lmcache_core.backends.chunk_files import SUFFIX, ensure_writable_dir, write_atomically
from lmcache_core.backends.frame_store import (
    FrameParts,
    FrameStore,
    Oversized,
)
from lmcache_core.errors import ConfigError
from lmcache_core.keys import CacheKey
from lmcache_core.metrics import Metrics
from lmcache_core.serdes.base import Serde

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig

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

    def _read(self, names: list[str], limit: int) -> list[bytes | memoryview | Oversized | None]:
        return [self._read_one(self.root / name, limit) for name in names]

    @staticmethod
    def _read_one(path: Path, limit: int) -> bytes | Oversized | None:
        """The file's bytes, its size checked before one is read; never through a symlink."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError:
            return b""  # a symlink or worse in a chunk's place: unusable, and deleted
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return b""
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
        for name, parts in items:
            final = self.root / name
            if not final.exists():
                tag = f"{self._tag}-{next(_counter)}"
                # Readable by the other hosts' processes; synced before it is visible.
                write_atomically(final, tag, parts, durable=True, mode=0o644)
        return [True] * len(items)

    def _exists(self, names: list[str]) -> list[bool]:
        return [(self.root / n).exists() for n in names]

    def _delete(self, names: list[str]) -> int:
        n = 0
        for name in names:
            try:
                (self.root / name).unlink()
                n += 1
            except FileNotFoundError:
                pass
        return n

    def _names(self) -> Iterator[str]:
        for path in self.root.glob(f"*/*/*{SUFFIX}"):
            yield str(path.relative_to(self.root))

    @property
    def capacity_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize
