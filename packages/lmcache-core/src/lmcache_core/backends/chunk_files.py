"""Chunk files on a filesystem: atomic writes, safe directory walks, page-cache control.

Shared by the tiers that keep one file per chunk (the local disk tier and the
shared-filesystem tier), so both write and clean up the same way: a chunk's
file appears under its name whole or not at all, a temporary file whose
writer died is recognised and removed, and symlinks are never followed.

Below the folder the user configured, nothing is resolved by path: each
folder is opened from its parent's descriptor with ``O_NOFOLLOW`` and
``O_DIRECTORY`` (:func:`open_dir`), and files are opened, listed and deleted
with ``dir_fd=`` (``openat``, ``unlinkat``, ``fstatat``). A folder swapped for
a symlink between a listing and a walk is then refused, never followed into
another part of the filesystem. A chunk file is opened only once it is known
to be a regular file, with ``O_NONBLOCK`` (:func:`open_regular`): a FIFO or a
device in a chunk's place is a miss, not a read that waits forever.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmcache_core.errors import ConfigError

logger = logging.getLogger(__name__)


def path_from_url(url: str) -> Path:
    """``file:///abs/path/``, ``file://relative/path/``, ``file://~/path/`` or a plain path.

    As upstream LMCache reads it: what follows ``file://`` is the path, so its
    own example ``file://local_disk/`` is the folder ``local_disk/`` (a URL
    parser would make ``local_disk`` a host and the path ``/``), and a leading
    ``~`` is the home directory.
    """
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if scheme.lower() != "file" or not rest:
            raise ConfigError([f"local_disk={url!r} must be a path or a file:///path/ URL"])
        url = rest
    return Path(url).expanduser()


#: Flags of every folder opened below a tier's root: never through a symlink.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Flags of a chunk file opened for reading: no symlink, no wait (a FIFO), no tty.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class NotAChunkFile(OSError):
    """Something other than a regular file (a symlink, a FIFO, a folder) in a chunk's place."""


def open_root(path: Path) -> int:
    """A descriptor of a tier's root folder (the configured path, which may be a symlink)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir(name: str, dir_fd: int, *, create: bool = False) -> int:
    """The folder ``name`` in the folder ``dir_fd``, opened without following a symlink.

    With ``create`` a missing folder is made, and a symlink in its place (which a
    reader never follows) is removed first: only the link, never what it points
    to. Anything else in its place (a file) raises ``NotADirectoryError``.
    """
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    except NotADirectoryError:
        if not create or not _is_symlink(name, dir_fd):
            raise
        logger.warning("chunk files: a symlink in place of the folder %s; replaced by one", name)
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    try:
        os.mkdir(name, dir_fd=dir_fd)
    except FileExistsError:
        pass  # made meanwhile by another thread or process; the open says what it is
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@contextmanager
def opened_dir(name: str, dir_fd: int, *, create: bool = False) -> Iterator[int]:
    """:func:`open_dir` as a context manager: the descriptor is closed on leaving."""
    fd = open_dir(name, dir_fd, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_regular(name: str, dir_fd: int) -> int:
    """A chunk file in the folder ``dir_fd``, opened for reading; only a regular file.

    Its type is checked before it is opened (``fstatat``, no symlink followed) and
    again on the descriptor, and it is opened with ``O_NONBLOCK``: a FIFO swapped in
    between the two is not waited on. Raises ``FileNotFoundError`` when nothing is
    there and :class:`NotAChunkFile` for anything but a regular file.
    """
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise NotAChunkFile(f"{name} is not a regular file ({stat.filemode(st.st_mode)})")
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise NotAChunkFile(f"{name} cannot be opened as a chunk file ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAChunkFile(f"{name} is not a regular file ({stat.filemode(st.st_mode)})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomically(
    final: Path | str,
    tag: str,
    parts: Sequence[bytes | memoryview],
    *,
    durable: bool = False,
    mode: int = 0o600,
    uncached: bool = False,
    dir_fd: int | None = None,
) -> None:
    """Write ``parts`` (header and payload views: no join, no copy) under ``final``.

    They go to a temporary name unique to ``tag`` and are renamed into place, so
    no reader ever sees a torn file under ``final``. ``durable`` fsyncs before the
    rename (a shared filesystem: other hosts must never see an empty file).
    ``uncached`` writes the data out and drops it from the OS page cache.
    With ``dir_fd``, ``final`` is a name in that folder (nothing resolved by path);
    without, a path whose folders are made as needed.
    """
    if dir_fd is None:
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        parent = open_root(final.parent)
        try:
            write_atomically(
                final.name, tag, parts, durable=durable, mode=mode, uncached=uncached,
                dir_fd=parent,
            )  # fmt: skip
        finally:
            os.close(parent)
        return
    name = os.fspath(final)
    tmp = f".{name}.tmp-{tag}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            n = os.writev(fd, views)
            while views and n >= views[0].nbytes:  # drop what was written (short writes)
                n -= views[0].nbytes
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        if durable:
            os.fsync(fd)
        if uncached:
            drop_page_cache(fd, written=True)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp, dir_fd)
        raise
    os.close(fd)
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(tmp, dir_fd)
        raise


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def subdir_names(dir_fd: int) -> list[str]:
    """Names of the sub-folders of the folder ``dir_fd`` (symlinks are not folders here)."""
    try:
        with os.scandir(dir_fd) as it:
            return [e.name for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def subdirs(path: Path) -> Iterator[Path]:
    """Sub-folders of ``path``, never through a symlink."""
    try:
        with os.scandir(path) as it:
            entries = [e for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for e in entries:
        yield Path(e.path)


SUFFIX = ".chunk"
_SHARD_DIR = re.compile(r"^[0-9a-f]{2}$")


@dataclass(frozen=True)
class ChunkFile:
    """A ``*.chunk`` file of a namespace folder: ``<shard>/<name>``, as listed."""

    shard: str
    name: str
    nbytes: int  # its size
    mtime: float


def chunk_files_at(ns_fd: int) -> Iterator[ChunkFile]:
    """The ``*.chunk`` regular files of the namespace folder ``ns_fd``, in its shard folders.

    Never through a symlink (each shard is opened from ``ns_fd`` with
    ``O_NOFOLLOW``); temporary files whose writer is gone are deleted on the
    way (one that another process is writing now is left alone).
    """
    me = os.getpid()
    for shard in subdir_names(ns_fd):
        if not _SHARD_DIR.match(shard):
            continue
        try:
            shard_fd = open_dir(shard, ns_fd)
        except OSError:
            continue  # swapped for a symlink (or gone) since the listing
        try:
            found = []
            with os.scandir(shard_fd) as it:
                for entry in it:
                    name = entry.name
                    if name.startswith(".") and ".tmp" in name:
                        if writer_gone(name, me) and entry.is_file(follow_symlinks=False):
                            _unlink_quietly(name, shard_fd)
                    elif name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        found.append(ChunkFile(shard, name, st.st_size, st.st_mtime))
        except OSError:
            found = []
        finally:
            os.close(shard_fd)
        yield from found


def writer_gone(tmp_name: str, me: int) -> bool:
    """Whether the process that wrote ``.<name>.tmp-<pid>-<n>`` is gone (or was this one)."""
    try:
        pid = int(tmp_name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return True
    if pid == me:
        return True  # a crashed earlier life of a pid we reuse, or ours from before a fork
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, someone else's
    return False


def unlink_at(ns_fd: int, shard: str, name: str, *, rmdir: bool = False) -> bool:
    """Delete the chunk file ``<shard>/<name>`` of the namespace folder ``ns_fd``.

    The shard is opened without following a symlink; something other than a
    file in the chunk's place (a folder) is left and logged. ``rmdir`` also
    removes the shard folder once it is empty. True when a file was deleted.
    """
    try:
        shard_fd = open_dir(shard, ns_fd)
    except OSError:
        return False  # no such shard, or a symlink in its place: nothing of ours there
    try:
        os.unlink(name, dir_fd=shard_fd)
        deleted = True
    except FileNotFoundError:
        deleted = False
    except OSError as e:
        logger.warning("disk tier: cannot delete %s/%s (%s)", shard, name, e.strerror)
        deleted = False
    finally:
        os.close(shard_fd)
    if rmdir:
        try:
            os.rmdir(shard, dir_fd=ns_fd)
        except OSError:
            pass  # other files still in it, or gone
    return deleted


def ensure_writable_dir(path: Path, key: str, fix: str) -> None:
    """Create ``path`` if needed; a clear config error naming ``key`` if it is not writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError([f"{key}: cannot create {path} ({e.strerror}); {fix}"]) from None
    if not os.access(path, os.W_OK):
        raise ConfigError([f"{key}: {path} is not writable by this process; {fix}"])


def drop_page_cache(fd: int, *, written: bool) -> None:
    """Drop a file's pages from the OS page cache (flushing them first if ``written``).

    What upstream's ``use_odirect`` is for, without O_DIRECT's aligned-buffer
    rules: a disk tier does not double as a second DRAM cache.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    if written:
        os.fdatasync(fd)  # dirty pages are not dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
