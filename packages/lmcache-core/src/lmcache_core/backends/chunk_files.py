"""Chunk files on a filesystem: atomic writes, safe directory walks, page-cache control.

Shared by the tiers that keep one file per chunk (the local disk tier and the
shared-filesystem tier), so both write and clean up the same way: a chunk's
file appears under its name whole or not at all, a temporary file whose
writer died is recognised and removed, and symlinks are never followed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
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


def write_atomically(
    final: Path,
    tag: str,
    parts: Sequence[bytes | memoryview],
    *,
    durable: bool = False,
    mode: int = 0o600,
    uncached: bool = False,
) -> None:
    """Write ``parts`` (header and payload views: no join, no copy) under ``final``.

    They go to a temporary name unique to ``tag`` and are renamed into place, so
    no reader ever sees a torn file under ``final``. ``durable`` fsyncs before the
    rename (a shared filesystem: other hosts must never see an empty file).
    ``uncached`` writes the data out and drops it from the OS page cache.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
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
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)


def subdirs(path: Path) -> Iterator[Path]:
    """Sub-folders of ``path``, never through a symlink."""
    try:
        with os.scandir(path) as it:
            entries = [e for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for e in entries:
        yield Path(e.path)


def files(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_file(follow_symlinks=False)]
    except OSError:
        return []


SUFFIX = ".chunk"
_SHARD_DIR = re.compile(r"^[0-9a-f]{2}$")


def chunk_entries(ns_dir: Path) -> Iterator[os.DirEntry[str]]:
    """The ``*.chunk`` files of a namespace folder, in its shard folders (``<xx>/``).

    Never through a symlink; temporary files whose writer is gone are deleted
    on the way (one that another process is writing now is left alone).
    """
    me = os.getpid()
    for shard in subdirs(ns_dir):
        if not _SHARD_DIR.match(shard.name):
            continue
        for entry in files(shard):
            name = entry.name
            if name.startswith(".") and ".tmp" in name:
                if writer_gone(name, me):
                    unlink_chunk(Path(entry.path))
            elif name.endswith(SUFFIX):
                yield entry


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


def unlink_chunk(path: Path) -> None:
    """Delete a chunk file; something else in its place (a folder) is left and logged."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("disk tier: cannot delete %s (%s)", path, e.strerror)


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
