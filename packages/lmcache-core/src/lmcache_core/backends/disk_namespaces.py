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

Nothing is resolved by path twice: the root folder is opened once, each
namespace folder from its descriptor with ``O_NOFOLLOW`` (a folder swapped
for a symlink after it was listed is skipped, never followed), and its lock,
shard folders and files from the namespace's descriptor (``dir_fd=``). So
neither a reclaim nor ``lmcache disk --prune`` can be redirected outside the
root, however the folders change between the listing and the walk.
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

from lmcache_core.backends.chunk_files import (
    chunk_files_at,
    open_dir,
    open_root,
    subdir_names,
    unlink_at,
)

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_NAMESPACE_DIR = re.compile(r"^[0-9a-f]{32}$")
_CHUNK_FILE = re.compile(r"^v[0-9]+-([0-9a-f]{32})-[0-9a-f]+\.chunk$")


def _open_lock(ns_fd: int) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    return os.open(LOCK_NAME, flags, 0o600, dir_fd=ns_fd)


def hold(ns_fd: int, where: Path) -> int | None:
    """Mark the namespace folder ``ns_fd`` (at ``where``, for messages) in use by this
    process until the returned descriptor is closed.

    Blocks only while another process is deleting this namespace's files as
    orphans. None (logged) where the filesystem has no ``flock``.
    """
    try:
        fd = _open_lock(ns_fd)
    except OSError as e:  # a symlink or a folder in the lock's place, permissions
        logger.warning(
            "disk tier: cannot open %s (%s); this namespace is not marked in use, and "
            "unused namespaces are not reclaimed by this process",
            where / LOCK_NAME,
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
                where.name,
                where.parent,
            )
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as e:
        os.close(fd)
        logger.warning(
            "disk tier: %s has no file locks (%s); namespaces no process uses are not "
            "reclaimed on this filesystem",
            where.parent,
            e.strerror,
        )
        return None
    return fd


@contextmanager
def unused(ns_fd: int) -> Iterator[bool | None]:
    """True inside the block when no process holds the namespace folder ``ns_fd`` (it is
    then held exclusively).

    False when one does; None when this process cannot tell (no permission to
    open the lock, no ``flock``): treated as in use.
    """
    try:
        fd = _open_lock(ns_fd)
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


@contextmanager
def namespace_dir(root_fd: int, name: str) -> Iterator[int | None]:
    """The namespace folder ``name`` of the root ``root_fd``, opened without following a
    symlink; None inside the block when it is not a folder (any more)."""
    try:
        fd = open_dir(name, root_fd)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def namespace_names(root_fd: int) -> list[str]:
    """The namespace folders under the root ``root_fd``, as listed now."""
    return sorted(n for n in subdir_names(root_fd) if _NAMESPACE_DIR.match(n))


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
    root_fd = open_root(root)
    try:
        for name in namespace_names(root_fd):
            with namespace_dir(root_fd, name) as ns_fd:
                if ns_fd is None:
                    continue  # a symlink (or a file) since the listing: never followed
                with unused(ns_fd) as free:
                    got = list(_chunk_files(ns_fd, name))
                    pruned = bool(prune and free and got)
                    if pruned:
                        for f in got:
                            _delete(ns_fd, f)
            out.append(
                NamespaceUsage(
                    name,
                    None if free is None else not free,
                    len(got),
                    sum(f.nbytes for f in got),
                    max((f.mtime for f in got), default=None),
                    pruned,
                )
            )
            if on_namespace is not None:
                on_namespace(name)
    finally:
        os.close(root_fd)
    return out


@dataclass(frozen=True)
class OrphanFile:
    mtime: float
    namespace: str  # the namespace folder under the root
    shard: str
    name: str
    nbytes: int  # on disk

    @property
    def path(self) -> Path:
        """Relative to the root (for messages: files are deleted by descriptor)."""
        return Path(self.namespace, self.shard, self.name)


class OrphanFiles:
    """The chunk files of the namespaces under ``root`` that no process uses, oldest first.

    Found at start and again at most every ``rescan_s`` seconds (:meth:`scan`,
    called off the tier's lock): in a rolling update the old process often
    still holds its namespace when the new one starts. The root is held open
    (``root_fd``, duplicated, or opened here) and everything below it is
    reached by descriptor: files are named by namespace, shard and name, never
    by a path resolved again when they are deleted minutes later.
    """

    def __init__(
        self, root: Path, own: str, rescan_s: float = 60.0, *, root_fd: int | None = None
    ) -> None:
        self.root, self.own, self.rescan_s = root, own, rescan_s
        self._root_fd = os.dup(root_fd) if root_fd is not None else open_root(root)
        self._lock = threading.Lock()  # the queue
        self._scanning = threading.Lock()  # one scan at a time
        self._files: deque[OrphanFile] = deque()
        self._known: set[str] = set()  # orphan namespaces whose files are queued
        self._next_scan = 0.0
        self.nbytes = 0
        self.scan()

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        with self._lock:
            if self._root_fd >= 0:
                os.close(self._root_fd)
                self._root_fd = -1
            self._files.clear()
            self.nbytes = 0

    def __del__(self) -> None:
        fd = getattr(self, "_root_fd", -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

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
        root_fd = self._root_fd
        if root_fd < 0:
            return
        for name in namespace_names(root_fd):
            if name == self.own or name in self._known:
                continue
            with namespace_dir(root_fd, name) as ns_fd:
                if ns_fd is None:
                    continue
                with unused(ns_fd) as free:
                    if free:
                        got = list(_chunk_files(ns_fd, name))
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

    def _forget(self, namespace: str) -> None:
        """Drop ``namespace``'s queued files without deleting them (the queue's lock held)."""
        q = self._files
        kept = deque(f for f in q if f.namespace != namespace)
        self.nbytes -= sum(f.nbytes for f in q) - sum(f.nbytes for f in kept)
        self._files = kept
        self._known.discard(namespace)

    def reclaim(self, need: int) -> int:
        """Delete the oldest orphan files until ``need`` bytes are freed; how many files.

        A namespace some process took up again since the scan is no orphan any
        more: its files are forgotten here, not deleted. So is one whose folder is
        no folder any more (a symlink swapped in): nothing is followed.
        """
        freed = deleted = 0
        with self._lock:
            while self._files and freed < need and self._root_fd >= 0:
                ns = self._files[0].namespace
                with namespace_dir(self._root_fd, ns) as ns_fd:
                    if ns_fd is None:
                        self._forget(ns)
                        continue
                    with unused(ns_fd) as free:
                        if not free:
                            self._forget(ns)
                            continue
                        q = self._files
                        while q and freed < need and q[0].namespace == ns:
                            f = q.popleft()
                            _delete(ns_fd, f)
                            self.nbytes -= f.nbytes
                            freed += f.nbytes
                            deleted += 1
            if not self._files:
                self._known.clear()  # all deleted: a namespace orphaned again is found anew
        return deleted


def _chunk_files(ns_fd: int, namespace: str) -> Iterator[OrphanFile]:
    """This module's files in an orphan namespace: chunk names of that namespace only."""
    for f in chunk_files_at(ns_fd):
        m = _CHUNK_FILE.match(f.name)
        if m is None or m.group(1) != namespace:
            continue
        yield OrphanFile(f.mtime, namespace, f.shard, f.name, f.nbytes)


def _delete(ns_fd: int, f: OrphanFile) -> None:
    """Delete an orphan's chunk file, and its shard folder once that is empty."""
    unlink_at(ns_fd, f.shard, f.name, rmdir=True)
