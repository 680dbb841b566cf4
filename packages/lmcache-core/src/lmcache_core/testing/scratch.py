"""Scratch folders for store tests, all removed when the test process exits.

A conformance suite builds a store for every test and hypothesis example
(hundreds per run), and a store on a filesystem leaves its files behind when
it is closed: that is what a disk tier is for. Made here, they all live under
one temporary folder of the process, removed at exit, so a test run leaves
nothing in ``/tmp`` however many stores it made.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

_root: tempfile.TemporaryDirectory[str] | None = None


def scratch_dir(prefix: str = "store-") -> Path:
    """A new empty folder, removed (with everything in it) when the process exits."""
    global _root
    if _root is None:
        _root = tempfile.TemporaryDirectory(prefix="lmcache-tests-")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_root.name))


def scratch_file(name: str = "store.bin") -> Path:
    """A path, not yet a file, in a new scratch folder (for stores that create their file)."""
    return scratch_dir() / name
