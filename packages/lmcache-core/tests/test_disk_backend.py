"""The local disk tier: the shipped storage contract, restarts, torn writes, corruption."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.backends.disk import LocalDiskBackend
from lmcache_core.errors import ConfigError
from lmcache_core.testing import (
    ChunkFactory,
    StorageBackendTests,
    backend_state_machine,
    chunk_payload,
    test_key,
)
from lmcache_core.testing.scratch import scratch_dir


def make_disk(capacity_bytes: int, slot_bytes: int) -> LocalDiskBackend:
    return LocalDiskBackend(scratch_dir(), capacity_bytes)


class TestLocalDiskBackend(StorageBackendTests):
    def make_backend(self, capacity_bytes, slot_bytes):
        return make_disk(capacity_bytes, slot_bytes)

    def raw_get(self, backend, key):
        path = backend._path(key)
        return path.read_bytes() if path.exists() else None

    def raw_set(self, backend, key, value):
        backend._path(key).write_bytes(value)

    def raw_path(self, backend, key):
        return backend._path(key)


TestLocalDiskBackendStateful = backend_state_machine(make_disk, max_examples=30).TestCase


def _put(backend, factory, ids, nbytes=4096):
    for i in ids:
        c = factory.make(test_key(i), nbytes)
        assert backend.put([c]) == [True]
        c.release()


def _read(backend, factory, i):
    (c,) = backend.get([test_key(i)], factory.allocate)
    if c is None:
        return None
    data = bytes(c.view)
    c.release()
    return data


def test_a_restarted_tier_finds_every_chunk(tmp_path):
    f = ChunkFactory(4096)
    first = LocalDiskBackend(tmp_path, 1 << 20)
    _put(first, f, range(5))
    second = LocalDiskBackend(tmp_path, 1 << 20)
    assert second.used_bytes == 5 * 4096
    assert set(second.keys()) == {test_key(i) for i in range(5)}
    for i in range(5):
        assert _read(second, f, i) == chunk_payload(test_key(i), 4096)


def test_a_restart_with_a_smaller_bound_evicts_the_oldest(tmp_path):
    f = ChunkFactory(4096)
    first = LocalDiskBackend(tmp_path, 1 << 20)
    for i in range(4):
        _put(first, f, [i])
        p = first._path(test_key(i))
        os.utime(p, (1000 + i, 1000 + i))
    second = LocalDiskBackend(tmp_path, 2 * 4096)
    assert second.contains([test_key(i) for i in range(4)]) == [False, False, True, True]
    assert not first._path(test_key(0)).exists()


def test_corrupt_truncated_and_misplaced_files_are_misses(tmp_path):
    f = ChunkFactory(4096)
    disk = LocalDiskBackend(tmp_path, 1 << 20)
    _put(disk, f, range(4))
    p0, p1, p2 = (disk._path(test_key(i)) for i in range(3))
    data = bytearray(p0.read_bytes())
    data[-10] ^= 0x01
    p0.write_bytes(data)  # a flipped bit
    p1.write_bytes(p1.read_bytes()[:-100])  # a truncated file
    p2.write_bytes(disk._path(test_key(3)).read_bytes())  # another chunk's frame
    for i in range(3):
        assert _read(disk, f, i) is None
        assert not disk._path(test_key(i)).exists(), "a bad file must be dropped"
    assert disk.metrics.get("lmcache:num_corrupt_chunks") == 3
    assert _read(disk, f, 3) == chunk_payload(test_key(3), 4096)


def test_leftover_temporary_files_are_never_served(tmp_path):
    f = ChunkFactory(4096)
    disk = LocalDiskBackend(tmp_path, 1 << 20)
    _put(disk, f, [0])
    final = disk._path(test_key(0))
    torn = final.parent / f".{final.name}.tmp123-0"
    torn.write_bytes(final.read_bytes()[:50])
    final.unlink()
    again = LocalDiskBackend(tmp_path, 1 << 20)
    assert again.contains([test_key(0)]) == [False]
    assert not torn.exists()


_WRITER = r"""
import sys
from lmcache_core.backends.disk import LocalDiskBackend
from lmcache_core.testing import ChunkFactory, test_key
disk = LocalDiskBackend(sys.argv[1], 1 << 30)
f = ChunkFactory(1 << 20, num_slots=4)
i = 0
print("writing", flush=True)
while True:
    c = f.make(test_key(i), 1 << 20)
    disk.put([c])
    c.release()
    i += 1
"""


def test_kill_9_in_the_middle_of_writes_leaves_no_torn_chunk(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    import time

    time.sleep(1.0)
    proc.kill()
    proc.wait()
    f = ChunkFactory(1 << 20, num_slots=4)
    disk = LocalDiskBackend(tmp_path, 1 << 30)
    found = sorted(disk.keys())
    assert found, "the writer stored nothing before it was killed"
    n = len(found)
    for i in range(n):
        (c,) = disk.get([test_key(i)], f.allocate)
        assert c is not None, f"complete chunk {i} was lost"
        assert bytes(c.view) == chunk_payload(test_key(i), 1 << 20)
        c.release()
    assert disk.metrics.get("lmcache:num_corrupt_chunks") == 0


def test_engine_hits_from_disk_after_a_restart_and_promotes_to_dram(tmp_path):
    import numpy as np
    from lmcache_core.transfer import ChunkIO
    from lmcache_core.transfer_numpy import NumpyPagedKV, layer_shape

    layout = KVLayout(
        kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
    )
    cfg = {
        "chunk_size": 16,
        "max_local_cpu_size": "1MiB",
        "local_disk": f"file://{tmp_path}",
        "max_local_disk_size": "16MiB",
    }
    rng = np.random.default_rng(0)
    src = [rng.integers(1, 2**16, size=layer_shape(layout, 32), dtype=np.uint16) for _ in range(2)]
    tokens = list(range(48))
    with CacheEngine(CacheConfig.from_dict(cfg), model="m", layout=layout) as a:
        assert [t.name for t in a.tiers] == ["cpu", "disk"]
        assert a.store(tokens, NumpyPagedKV(layout, src, range(12))) == 48
    dst = [np.zeros_like(x) for x in src]
    with CacheEngine(CacheConfig.from_dict(cfg), model="m", layout=layout) as b:
        assert b.lookup(tokens) == 48
        assert b.retrieve(tokens, NumpyPagedKV(layout, dst, range(12, 24))) == 48
        assert b.cpu.contains(b.chunk(tokens).keys(b.namespace)) == [True] * 3
    want, got = bytearray(layout.chunk_bytes(48)), bytearray(layout.chunk_bytes(48))
    NumpyPagedKV(layout, src, range(12)).read_chunks([ChunkIO(0, 48, memoryview(want))])
    NumpyPagedKV(layout, dst, range(12, 24)).read_chunks([ChunkIO(0, 48, memoryview(got))])
    assert want == got


def test_unwritable_paths_are_config_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create"):
        LocalDiskBackend(blocker / "sub", 1 << 20)
    with pytest.raises(ConfigError, match="file:///path/"):
        from lmcache_core.backends.chunk_files import path_from_url

        path_from_url("s3://bucket/x")


def test_use_odirect_keeps_chunks_out_of_the_page_cache_and_still_round_trips(tmp_path):
    """Upstream's extra_config.use_odirect: files are flushed and dropped from the page cache."""
    from lmcache_core import CacheConfig, CacheEngine, KVLayout
    from lmcache_core.errors import ConfigError
    from lmcache_core.testing.paged_memory import PagedKVMemory

    layout = KVLayout(
        kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
    )
    base = {"chunk_size": 16, "local_cpu": False, "local_disk": f"file://{tmp_path}/"}
    base["max_local_disk_size"] = "1MiB"
    config = CacheConfig.from_dict({**base, "extra_config": {"use_odirect": "true"}})
    src, dst = PagedKVMemory(layout, seed=1), PagedKVMemory(layout, seed=2)
    with CacheEngine(config, model="m", layout=layout) as engine:
        disk = engine.tiers[0].backend
        assert disk.uncached
        assert engine.store(list(range(48)), src.kv(src.table(48, 0))) == 48
        assert engine.flush(10)
        assert engine.retrieve(list(range(48)), dst.kv(dst.table(48, 5))) == 48
    # A value that is no boolean is refused when the config is read, named by its key.
    with pytest.raises(ConfigError, match="extra_config.use_odirect"):
        CacheConfig.from_dict({**base, "extra_config": {"use_odirect": "maybe"}})


def _within(seconds, fn):
    """``fn()`` on a thread, failing (not hanging) when it takes longer than ``seconds``."""
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"took longer than {seconds} s: a read waited on a FIFO"
    return got[0]


def test_a_fifo_in_place_of_a_chunk_file_is_a_miss_at_start_and_at_read(tmp_path):
    """A FIFO (a writer that never comes) in a chunk's place hung that retrieve forever.
    Now chunk files are opened only once they are regular files, with O_NONBLOCK."""
    f = ChunkFactory(4096)
    tier = LocalDiskBackend(tmp_path, 1 << 20)
    _put(tier, f, [1, 2, 3])
    for i in (1, 2):
        path = tier._path(test_key(i))
        path.unlink()
        os.mkfifo(path, 0o600)
    assert _within(5, lambda: _read(tier, f, 1)) is None  # read: a miss, counted as corrupt
    assert tier.contains([test_key(1)]) == [False]
    again = _within(5, lambda: LocalDiskBackend(tmp_path, 1 << 20))  # a restart lists it
    assert again.contains([test_key(i) for i in (1, 2, 3)]) == [False, False, True]
    assert _within(5, lambda: _read(again, f, 2)) is None
    assert _read(again, f, 3) == chunk_payload(test_key(3), 4096)
    _put(again, f, [2])  # a fresh put replaces the FIFO with the chunk
    assert _read(again, f, 2) == chunk_payload(test_key(2), 4096)
    tier.close()
    again.close()


def test_the_engine_waits_on_a_fifo_in_the_disk_tier_at_most_blocking_timeout(tmp_path):
    """End to end: a disk tier whose read blocks (here: a FIFO opened the old way, by a
    backend that does not check) costs a retrieve ``blocking_timeout_secs``, not forever."""
    import time

    from lmcache_core.testing.paged_memory import PagedKVMemory

    layout = KVLayout(
        kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
    )
    config = CacheConfig.from_dict(
        {
            "chunk_size": 16,
            "local_cpu": False,
            "local_disk": f"file://{tmp_path}/",
            "max_local_disk_size": "1MiB",
            "blocking_timeout_secs": 0.5,
        }
    )
    src, dst = PagedKVMemory(layout, seed=1), PagedKVMemory(layout, seed=2)
    with CacheEngine(config, model="m", layout=layout) as engine:
        assert engine.store(list(range(32)), src.kv(src.table(32, 0))) == 32
        assert engine.flush(10)
        disk = engine.tiers[0].backend
        paths = list(tmp_path.rglob("*.chunk"))
        assert paths
        for p in paths:
            p.unlink()
            os.mkfifo(p, 0o600)
        # A backend that opens the old way (no type check, blocking): a hung mount.
        disk._open = lambda key: os.open(disk._path(key), os.O_RDONLY)
        t0 = time.monotonic()
        got = _within(10, lambda: engine.retrieve(list(range(32)), dst.kv(dst.table(32, 5))))
        assert got == 0 and time.monotonic() - t0 < 5
        for p in paths:  # let the hung open end (a writer comes), so the thread finishes
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: nobody waits on this one
                pass
