"""The shared-memory arena of an ``lmcache server``: the data plane of MP mode.

The server makes one arena (its DRAM tier) and hands every client a file
descriptor for it over the Unix socket (``SCM_RIGHTS``); the client maps it,
so an engine's kernels copy KV straight into and out of the server's pool
slots, and no socket ever carries KV bytes.

Why a ``memfd`` by default: it has no name, so nothing is left in
``/dev/shm`` when the server is killed, nobody can open it by guessing a name,
and a client in another container that reaches the socket (a hostPath or an
emptyDir shared by the pods of a node) gets it without ``hostIPC``. A POSIX
shared-memory name (``shm_name``) is for clients that reach the server over
TCP on the same host and must open it themselves.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import stat

from lmcache_core.arena import MADV_POPULATE_WRITE, MmapArena

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


class SharedArena(MmapArena):
    """A shared mapping of a memfd (or a named POSIX shared-memory object)."""

    def __init__(self, size: int, *, shm_name: str | None = None, prefault: bool = True) -> None:
        if size <= 0:
            raise ValueError(f"arena size must be positive, got {size}")
        self.shm_name = shm_name
        if shm_name:
            path = shm_path(shm_name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        else:
            fd = os.memfd_create("lmcache-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except Exception:
            os.close(fd)
            if shm_name:
                _unlink(shm_name)
            raise
        #: The descriptor clients are sent (kept open while the arena lives).
        self.fd = fd
        self._adopt(mapping, size)
        if prefault:
            self.prefault()

    def close(self) -> None:
        if self._mmap is None:
            return
        super().close()
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self.shm_name:
            _unlink(self.shm_name)


class ArenaMapping:
    """A client's mapping of a server's arena, from the descriptor the server sent.

    The size is checked against the file before mapping (a hostile or broken
    server cannot make the client map past the end of the object, which would
    turn a later copy into SIGBUS).
    """

    def __init__(self, fd: int, size: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"the server arena descriptor is no memory file (mode {st.st_mode:o})")
        if st.st_size < size:
            raise OSError(f"the server's arena is {st.st_size} bytes, not the {size} it claims")
        self.size = size
        self._mmap = mmap.mmap(
            fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.view = memoryview(self._mmap)
        self._anchor = ctypes.c_char.from_buffer(self._mmap)
        #: Address of the first byte in this process (for pinning it for a GPU).
        self.address = ctypes.addressof(self._anchor)
        self._populate()

    def _populate(self) -> None:
        """Map every page now (the server made them resident): without it, the first
        load through each page takes a fault in this process, milliseconds per 100 MB
        on the hit path."""
        try:
            self._mmap.madvise(MADV_POPULATE_WRITE)
        except (OSError, ValueError):  # kernels before 5.14: faults happen on first use
            pass

    def slice(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"a slot at [{offset}, {offset + nbytes}) lies outside the arena")
        return self.view[offset : offset + nbytes]

    @classmethod
    def open_named(cls, shm_name: str, size: int) -> ArenaMapping:
        fd = os.open(shm_path(shm_name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            return cls(fd, size)
        finally:
            os.close(fd)


def shm_path(name: str) -> str:
    """``/dev/shm/<name>``; the name must be a plain file name."""
    clean = name.lstrip("/")
    if not clean or "/" in clean or clean in (".", "..") or "\0" in clean:
        raise ValueError(f"shm_name={name!r} must be a plain name such as lmcache-arena")
    return os.path.join(SHM_DIR, clean)


def _unlink(name: str) -> None:
    try:
        os.unlink(shm_path(name))
    except OSError:
        pass
