"""Namespaces that share a disk tier's folder: which are in use, and reclaiming the rest.

Every chunk file lives under ``<root>/<namespace>/``, and a disk tier indexes
and evicts its own namespace only, so that tensor-parallel ranks and other
models sharing one ``local_disk`` never touch each other's files. But a
namespace changes whenever the KV would: another model, ``--hf-overrides``,
another KV dtype or chunk size, a new tensor-parallel size, an lmcache
upgrade that changes the key scheme. The old namespace's files then belonged
to nobody and stayed forever, and ``max_local_disk_size`` bounded nothing
after a few redeployments.

So each disk tier holds a shared ``flock`` on ``<root>/<namespace>/.lock``
for as long as it is open (the kernel drops it when the process dies, even
by ``kill -9``). A namespace whose lock can be taken exclusively is used by
no process: an *orphan*. Its chunk files count against the bound of every
disk tier on the same folder and are deleted, oldest first, before any of
the tier's own chunks (:class:`OrphanFiles`). An orphan is not deleted
earlier than room is needed, so a rollback soon after an upgrade still finds
its cache. Deletion happens under the exclusive lock; an owner that starts
meanwhile waits for it (a few unlinks), then indexes what is left.

Only names this module made are ever deleted: folders named as a namespace
digest (32 hex digits), chunk files ``v<N>-<that namespace>-<hex>.chunk``
and temporary files whose writer is gone. The ``.lock`` file and the empty
folder stay behind (bytes, not gigabytes), which keeps the lock's inode the
one every process opens.

Where ``flock`` is not supported (some network filesystems) nothing is
reclaimed and a warning says so.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmcache_core.backends.chunk_files import chunk_entries, subdirs, unlink_chunk

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_NAMESPACE_DIR = re.compile(r"^[0-9a-f]{32}$")
_CHUNK_FILE = re.compile(r"^v[0-9]+-([0-9a-f]{32})-[0-9a-f]+\.chunk$")


def _open_lock(ns_dir: Path) -> int:
    return os.open(ns_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def hold(ns_dir: Path) -> int | None:
    """Mark ``ns_dir`` in use by this process until the returned descriptor is closed.

    Blocks only while another process is deleting this namespace's files as
    orphans. None (logged) where the filesystem has no ``flock``.
    """
    try:
        ns_dir.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(ns_dir)
    except OSError as e:  # a symlink or a folder in the lock's place, permissions
        logger.warning(
            "disk tier: cannot open %s (%s); this namespace is not marked in use, and "
            "unused namespaces are not reclaimed by this process",
            ns_dir / LOCK_NAME,
            e.strerror,
        )
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Another live process has this namespace here (two replicas of one model on
            # a host, one folder): each indexes what it writes, so neither finds the
            # other's new chunks, and the folder holds up to twice the bound.
            logger.warning(
                "disk tier: another process uses namespace %s in %s; each bounds and finds "
                "only the chunks it wrote since it started: give each instance its own "
                "local_disk folder (share KV between instances through p2p, Redis or S3)",
                ns_dir.name,
                ns_dir.parent,
            )
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as e:
        os.close(fd)
        logger.warning(
            "disk tier: %s has no file locks (%s); namespaces no process uses are not "
            "reclaimed on this filesystem",
            ns_dir.parent,
            e.strerror,
        )
        return None
    return fd


@contextmanager
def unused(ns_dir: Path) -> Iterator[bool | None]:
    """True inside the block when no process holds ``ns_dir`` (it is then held exclusively).

    False when one does; None when this process cannot tell (no permission to
    open the lock, no ``flock``): treated as in use.
    """
    try:
        fd = _open_lock(ns_dir)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:
            yield None
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


@dataclass(frozen=True)
class NamespaceUsage:
    """One namespace folder under a disk tier's folder, as ``lmcache disk`` reports it."""

    namespace: str
    in_use: bool | None  # None: cannot tell (see :func:`unused`)
    files: int
    nbytes: int
    newest: float | None  # mtime of its newest chunk file
    pruned: bool = False


def survey(
    root: Path, *, prune: bool = False, on_namespace: Callable[[str], None] | None = None
) -> list[NamespaceUsage]:
    """Every namespace folder under ``root``; ``prune`` deletes the unused ones' chunk files now."""
    out = []
    dirs = sorted(d for d in subdirs(root) if _NAMESPACE_DIR.match(d.name))
    for ns_dir in dirs:
        with unused(ns_dir) as free:
            got = list(_chunk_files(ns_dir))
            pruned = bool(prune and free and got)
            if pruned:
                for f in got:
                    _delete(f)
        out.append(
            NamespaceUsage(
                ns_dir.name,
                None if free is None else not free,
                len(got),
                sum(f.nbytes for f in got),
                max((f.mtime for f in got), default=None),
                pruned,
            )
        )
        if on_namespace is not None:
            on_namespace(ns_dir.name)
    return out


@dataclass(frozen=True)
class OrphanFile:
    mtime: float
    path: Path
    nbytes: int  # on disk


class OrphanFiles:
    """The chunk files of the namespaces under ``root`` that no process uses, oldest first.

    Found at start and again at most every ``rescan_s`` seconds (:meth:`scan`,
    called off the tier's lock): in a rolling update the old process often
    still holds its namespace when the new one starts.
    """

    def __init__(self, root: Path, own: str, rescan_s: float = 60.0) -> None:
        self.root, self.own, self.rescan_s = root, own, rescan_s
        self._lock = threading.Lock()  # the queue
        self._scanning = threading.Lock()  # one scan at a time
        self._files: deque[OrphanFile] = deque()
        self._known: set[str] = set()  # orphan namespaces whose files are queued
        self._next_scan = 0.0
        self.nbytes = 0
        self.scan()

    def __len__(self) -> int:
        return len(self._files)

    def scan(self) -> None:
        """Queue the files of namespaces that became orphans since the last scan."""
        if time.monotonic() < self._next_scan or not self._scanning.acquire(blocking=False):
            return
        try:
            self._scan()
        finally:
            self._next_scan = time.monotonic() + self.rescan_s
            self._scanning.release()

    def _scan(self) -> None:
        found: list[OrphanFile] = []
        names = []
        for ns_dir in subdirs(self.root):
            name = ns_dir.name
            if name == self.own or name in self._known or not _NAMESPACE_DIR.match(name):
                continue
            with unused(ns_dir) as free:
                if free:
                    got = list(_chunk_files(ns_dir))
                    if got:
                        names.append(name)
                        found.extend(got)
        if not found:
            return
        with self._lock:
            self._files = deque(sorted([*self._files, *found], key=lambda f: f.mtime))
            self.nbytes += sum(f.nbytes for f in found)
            self._known.update(names)
        logger.info(
            "disk tier %s: %d chunk files (%d bytes) of %d namespaces no process uses; "
            "they are deleted first when room is needed",
            self.root,
            len(found),
            sum(f.nbytes for f in found),
            len(names),
        )

    def reclaim(self, need: int) -> int:
        """Delete the oldest orphan files until ``need`` bytes are freed; how many files.

        A namespace some process took up again since the scan is no orphan any
        more: its files are forgotten here, not deleted.
        """
        freed = deleted = 0
        with self._lock:
            q = self._files
            while q and freed < need:
                ns_dir = q[0].path.parent.parent
                with unused(ns_dir) as free:
                    if not free:
                        kept = deque(f for f in q if f.path.parent.parent != ns_dir)
                        self.nbytes -= sum(f.nbytes for f in q) - sum(f.nbytes for f in kept)
                        self._files = q = kept
                        self._known.discard(ns_dir.name)
                        continue
                    while q and freed < need and q[0].path.parent.parent == ns_dir:
                        f = q.popleft()
                        _delete(f)
                        self.nbytes -= f.nbytes
                        freed += f.nbytes
                        deleted += 1
            if not q:
                self._known.clear()  # all deleted: a namespace orphaned again is found anew
        return deleted


def _chunk_files(ns_dir: Path) -> Iterator[OrphanFile]:
    """This module's files in an orphan namespace: chunk names of that namespace only."""
    for entry in chunk_entries(ns_dir):
        m = _CHUNK_FILE.match(entry.name)
        if m is None or m.group(1) != ns_dir.name:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        yield OrphanFile(st.st_mtime, Path(entry.path), st.st_size)


def _delete(f: OrphanFile) -> None:
    """Delete an orphan's chunk file, and its shard folder once that is empty."""
    unlink_chunk(f.path)
    try:
        f.path.parent.rmdir()
    except OSError:
        pass  # other chunk files still in it, or gone
