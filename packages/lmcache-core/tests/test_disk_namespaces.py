"""A disk folder shared by namespaces: the bound holds after a model or config changes.

A namespace no process uses (an older model, ``--hf-overrides``, KV dtype,
chunk size or key scheme on the same ``local_disk``) used to keep its files
forever. Its files now count against the bound and go first; a namespace a
live process holds is never touched, and files lmcache did not make never are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.backends.disk import LocalDiskBackend
from lmcache_core.cache_key import CacheKey
from lmcache_core.testing import ChunkFactory, chunk_payload

CHUNK = 4096
OLD, NEW = b"\x0a" * 16, b"\x0b" * 16


def key(ns: bytes, i: int) -> CacheKey:
    return CacheKey.of(ns, i.to_bytes(8, "big"))


def put(tier: LocalDiskBackend, factory: ChunkFactory, keys) -> None:
    for k in keys:
        c = factory.make(k, CHUNK)
        assert tier.put([c]) == [True]
        c.release()


def chunk_files(root) -> dict[str, int]:
    """Every chunk file under ``root``: name -> size."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith(".chunk"):
                out[n] = os.path.getsize(os.path.join(d, n))
    return out


def stored_by_old_namespace(root, n: int) -> list[CacheKey]:
    """``n`` chunks of OLD, written oldest first, by a tier that is then closed."""
    f = ChunkFactory(CHUNK)
    old = LocalDiskBackend(root, 1 << 20, namespace=OLD)
    keys = [key(OLD, i) for i in range(n)]
    for i, k in enumerate(keys):
        put(old, f, [k])
        os.utime(old._path(k), (1000 + i, 1000 + i))
    old.close()
    return keys


def test_an_unused_namespace_is_deleted_oldest_first_before_the_tiers_own_chunks(tmp_path):
    old_keys = stored_by_old_namespace(tmp_path, 6)
    frame = next(iter(chunk_files(tmp_path).values()))  # a chunk file: header, key, payload
    new = LocalDiskBackend(tmp_path, 8 * frame, namespace=NEW)
    # Room enough for both: an old namespace stays (a rollback finds its cache).
    assert len(chunk_files(tmp_path)) == 6
    f = ChunkFactory(CHUNK)
    new_keys = [key(NEW, i) for i in range(5)]
    put(new, f, new_keys)
    assert new.contains(new_keys) == [True] * 5  # none of its own evicted
    files = chunk_files(tmp_path)
    assert sum(files.values()) <= 8 * frame  # the folder holds the bound
    assert [k.hex() + ".chunk" in files for k in old_keys] == [False] * 3 + [True] * 3
    assert new.metrics.get("lmcache:num_evictions", tier="disk") == 3
    new.close()
    # The old deployment, rolled back, finds what is left and reads it intact.
    again = LocalDiskBackend(tmp_path, 1 << 20, namespace=OLD)
    assert set(again.keys()) == set(old_keys[3:])
    for k in old_keys[3:]:
        (c,) = again.get([k], f.allocate)
        assert c is not None and bytes(c.view) == chunk_payload(k, CHUNK)
        c.release()


def test_unused_namespaces_over_the_bound_are_cut_to_it_at_start(tmp_path):
    stored_by_old_namespace(tmp_path, 6)
    frame = next(iter(chunk_files(tmp_path).values()))
    LocalDiskBackend(tmp_path, 2 * frame, namespace=NEW).close()
    assert sum(chunk_files(tmp_path).values()) == 2 * frame


HOLDER = textwrap.dedent(
    """
    import sys
    from lmcache_core.backends.disk import LocalDiskBackend
    tier = LocalDiskBackend(sys.argv[1], 1 << 20, namespace=bytes.fromhex(sys.argv[2]))
    print("ready", flush=True)
    sys.stdin.read()
    """
)


@contextlib.contextmanager
def another_process_holding(root, ns: bytes):
    """A live process with a disk tier of namespace ``ns`` on ``root``."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), ns.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_namespace_a_live_process_holds_is_never_touched_and_is_reclaimed_once_it_dies(
    tmp_path,
):
    old_keys = stored_by_old_namespace(tmp_path, 6)
    frame = next(iter(chunk_files(tmp_path).values()))
    with another_process_holding(tmp_path, OLD) as holder:
        new = LocalDiskBackend(tmp_path, 4 * frame, namespace=NEW)
        f = ChunkFactory(CHUNK)
        put(new, f, [key(NEW, i) for i in range(8)])
        files = chunk_files(tmp_path)
        assert all(k.hex() + ".chunk" in files for k in old_keys)  # in use: untouched
        assert new.used_bytes <= 4 * frame  # the tier evicted its own instead
        # A rolling update: the old process goes (kill -9 drops its lock too), and the
        # next scan finds its namespace unused.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        new._orphans._next_scan = 0.0  # the scan runs at most once a minute
        put(new, f, [key(NEW, 100)])
        assert sum(chunk_files(tmp_path).values()) <= 4 * frame
        assert not any(k.hex() + ".chunk" in chunk_files(tmp_path) for k in old_keys)
        new.close()


def test_files_lmcache_did_not_make_are_never_deleted(tmp_path):
    old_keys = stored_by_old_namespace(tmp_path, 2)
    foreign = [
        tmp_path / "notes" / "a.chunk",  # not a namespace folder
        tmp_path / OLD.hex() / "readme.txt",
        tmp_path / OLD.hex() / "zz" / f"v1-{OLD.hex()}-00.chunk",  # not a shard folder
        tmp_path / OLD.hex() / "00" / "data.chunk",  # not a chunk name
        tmp_path / OLD.hex() / "00" / f"v1-{NEW.hex()}-0001.chunk",  # another namespace's name
    ]
    for p in foreign:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 100)
    new = LocalDiskBackend(tmp_path, 1, namespace=NEW)  # room for nothing: reclaim everything
    assert len(new._orphans) == 0
    assert all(p.exists() for p in foreign)
    files = chunk_files(tmp_path)
    assert not any(k.hex() + ".chunk" in files for k in old_keys)  # lmcache's own: gone
    new.close()


def test_an_engine_for_another_model_keeps_the_shared_folder_within_its_bound(tmp_path):
    """What a user sees: the model changes, the disk tier's folder stays within the bound."""
    from lmcache_core.testing.paged_memory import PagedKVMemory

    layout = KVLayout(
        kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
    )
    per_chunk = layout.chunk_bytes(16)  # the bound is counted in payload bytes
    cfg = CacheConfig.from_dict(
        {
            "chunk_size": 16,
            "max_local_cpu_size": "1MiB",
            "local_disk": f"file://{tmp_path}",
            "max_local_disk_size": f"{12 * per_chunk // 1024}KiB",  # a bare number is GiB
        }
    )

    def fill(model: str, n_prompts: int) -> None:
        mem = PagedKVMemory(layout, num_blocks=64)
        with CacheEngine(cfg, model=model, layout=layout) as engine:
            for p in range(n_prompts):
                tokens = [p * 1000 + t for t in range(64)]  # 4 chunks each
                assert engine.store(tokens, mem.kv(range(16))) == 64
                engine.flush()

    fill("model-v1", 3)
    at_bound = chunk_files(tmp_path)  # 12 chunks: the bound
    assert len(at_bound) == 12
    fill("model-v2", 3)  # 12 more, in another namespace
    files = chunk_files(tmp_path)
    assert len(files) == len(at_bound) and sum(files.values()) == sum(at_bound.values())
    assert not set(files) & set(at_bound)  # the old model's all went, none of the new's


def test_lmcache_disk_reports_each_namespace_and_prunes_only_unused_ones(tmp_path, capsys):
    import json

    from lmcache_core.cli import main

    old_keys = stored_by_old_namespace(tmp_path, 3)
    live = LocalDiskBackend(tmp_path, 1 << 20, namespace=NEW)
    put(live, ChunkFactory(CHUNK), [key(NEW, 1), key(NEW, 2)])
    assert main(["disk", str(tmp_path), "--json"]) == 0
    rows = {r["namespace"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[OLD.hex()]["in_use"] is False and rows[OLD.hex()]["files"] == 3
    assert rows[NEW.hex()]["in_use"] is True and rows[NEW.hex()]["files"] == 2
    assert main(["disk", f"file://{tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "unused" in out and "in use" in out and "--prune deletes them now" in out
    assert main(["disk", str(tmp_path), "--prune"]) == 0
    files = chunk_files(tmp_path)
    assert not any(k.hex() + ".chunk" in files for k in old_keys)
    assert len(files) == 2  # the live tier's chunks stay
    live.close()
    assert main(["disk", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().out


def test_a_second_process_on_the_same_namespace_and_folder_is_warned(tmp_path, caplog):
    with another_process_holding(tmp_path, NEW), caplog.at_level("WARNING"):
        LocalDiskBackend(tmp_path, 1 << 20, namespace=NEW).close()
    assert "give each instance its own local_disk folder" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        LocalDiskBackend(tmp_path, 1 << 20, namespace=NEW).close()
    assert "another process" not in caplog.text


def test_a_lock_that_cannot_be_opened_degrades_to_no_reclaiming_not_a_failed_start(tmp_path):
    (tmp_path / NEW.hex()).mkdir()
    (tmp_path / NEW.hex() / ".lock").symlink_to("/dev/null")  # never followed
    tier = LocalDiskBackend(tmp_path, 1 << 20, namespace=NEW)
    assert tier._orphans is None
    put(tier, ChunkFactory(CHUNK), [key(NEW, 1)])
    assert tier.contains([key(NEW, 1)]) == [True]
    tier.close()


def test_a_full_filesystem_frees_unused_namespaces_before_lowering_the_bound(tmp_path, monkeypatch):
    import errno

    import lmcache_core.backends.disk as disk_module

    old_keys = stored_by_old_namespace(tmp_path, 4)
    tier = LocalDiskBackend(tmp_path, 1 << 20, namespace=NEW)
    f = ChunkFactory(CHUNK)
    put(tier, f, [key(NEW, 1), key(NEW, 2)])
    real = disk_module.write_atomically

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_module, "write_atomically", full)
    c = f.make(key(NEW, 3), CHUNK)
    with pytest.raises(OSError):
        tier.put([c])
    files = chunk_files(tmp_path)
    assert not any(k.hex() + ".chunk" in files for k in old_keys)  # freed first
    assert tier.capacity == 1 << 20  # the bound stays
    # With nothing unused left, a full filesystem lowers the bound to what the tier holds.
    with pytest.raises(OSError):
        tier.put([c])
    assert tier.capacity < 2 * CHUNK
    c.release()
    monkeypatch.setattr(disk_module, "write_atomically", real)
    tier.close()


# ---------------------------------------------------------------------------- symlinks


def outside_chunks(where, ns: bytes, n: int) -> dict[str, bytes]:
    """``n`` files named as ``ns``'s chunks (shard 00) in a folder outside the cache."""
    (where / "00").mkdir(parents=True)
    files = {}
    for i in range(n):
        name = f"00/v1-{ns.hex()}-{i:04x}.chunk"
        (where / name).write_bytes(b"not lmcache's %d" % i)
        files[name] = (where / name).read_bytes()
    return files


def untouched(where, files: dict[str, bytes]) -> bool:
    now = {str(p.relative_to(where)): p.read_bytes() for p in where.rglob("*") if p.is_file()}
    return now == files


def test_a_symlink_in_place_of_the_tiers_namespace_folder_is_never_followed(tmp_path):
    """It made 33 files outside the cache root and deleted one there: now the tier opens
    its namespace folder without following a symlink, and puts a real folder in its place."""
    root, outside = tmp_path / "cache", tmp_path / "outside"
    root.mkdir()
    outside_chunks(outside, NEW, 3)
    # A chunk-sized file under a chunk's name, and a dead writer's temp file: at start the
    # tier deletes such files in its own folder, and must not delete them here.
    giant = f"{key(NEW, 7).prefix.hex()[:2]}/{key(NEW, 7).hex()}.chunk"
    (outside / giant).parent.mkdir(exist_ok=True)
    (outside / giant).write_bytes(b"x" * (3 * CHUNK))
    (outside / "00" / ".x.chunk.tmp-999999999-1").write_bytes(b"someone's")
    files = {str(p.relative_to(outside)): p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    (root / NEW.hex()).symlink_to(outside, target_is_directory=True)

    tier = LocalDiskBackend(root, 1 << 20, namespace=NEW, max_chunk_bytes=CHUNK)
    f = ChunkFactory(CHUNK)
    keys = [key(NEW, i) for i in range(33)]
    put(tier, f, keys)
    tier.remove(keys[:5])
    assert untouched(outside, files), "the tier wrote or deleted through the symlink"
    assert (root / NEW.hex()).is_dir() and not (root / NEW.hex()).is_symlink()
    assert len(chunk_files(root)) == 28  # its own files, inside the root
    (c,) = tier.get([keys[10]], f.allocate)
    assert c is not None and bytes(c.view) == chunk_payload(keys[10], CHUNK)
    c.release()
    tier.close()


def test_a_symlink_in_place_of_a_shard_folder_is_never_followed(tmp_path):
    root, outside = tmp_path / "cache", tmp_path / "outside"
    tier = LocalDiskBackend(root, 1 << 20, namespace=NEW)
    f = ChunkFactory(CHUNK)
    k = key(NEW, 1)
    put(tier, f, [k])
    shard = tier._path(k).parent
    outside.mkdir()
    (outside / tier._path(k).name).write_bytes(b"someone else's file")
    again = LocalDiskBackend(root, 1 << 20, namespace=NEW)  # a restart: shard fds reopened
    tier.close()
    for p in shard.iterdir():
        p.unlink()
    shard.rmdir()
    shard.symlink_to(outside, target_is_directory=True)
    assert again.get([k], f.allocate) == [None]  # a miss; the file there is not read
    assert (outside / tier._path(k).name).read_bytes() == b"someone else's file"
    put(again, f, [key(NEW, 2)])  # same shard (the key's prefix): a real folder replaces the link
    assert shard.is_dir() and not shard.is_symlink()
    assert [p.name for p in outside.iterdir()] == [tier._path(k).name]
    again.close()


def swap_for_symlink(ns_dir, target) -> None:
    """What an attacker with write access to the cache root does between two steps."""
    ns_dir.rename(ns_dir.with_name(ns_dir.name + ".moved"))
    ns_dir.symlink_to(target, target_is_directory=True)


def test_prune_is_not_redirected_by_a_folder_swapped_for_a_symlink_after_listing(
    tmp_path, monkeypatch
):
    """`lmcache disk --prune` listed folders, then opened `<ns>/.lock` and walked `<ns>/` by
    path: a folder swapped for a symlink in between made it delete 50 of 50 chunk-named
    files outside the root. The swap is made at that very moment, through the listing."""
    import lmcache_core.backends.disk_namespaces as dn

    root, outside = tmp_path / "cache", tmp_path / "outside"
    stored_by_old_namespace(root, 3)
    files = outside_chunks(outside, OLD, 50)
    listed = dn.namespace_names

    def list_then_swap(root_fd):
        names = listed(root_fd)
        swap_for_symlink(root / OLD.hex(), outside)
        return names

    monkeypatch.setattr(dn, "namespace_names", list_then_swap)
    rows = dn.survey(root, prune=True)
    assert untouched(outside, files), "prune deleted files outside the cache root"
    assert OLD.hex() not in {r.namespace for r in rows}  # a symlink now: skipped
    assert len(chunk_files(root / (OLD.hex() + ".moved"))) == 3


def test_reclaim_is_not_redirected_by_a_folder_swapped_for_a_symlink_after_the_scan(tmp_path):
    """The orphans found at start are deleted minutes later, when room is needed: by then
    their folder may be a symlink. Nothing is resolved by path again."""
    root, outside = tmp_path / "cache", tmp_path / "outside"
    old_keys = stored_by_old_namespace(root, 4)
    names = {f"{k.prefix.hex()[:2]}/{k.hex()}.chunk" for k in old_keys}
    outside.mkdir()
    for name in names:  # the very names the scan queued
        (outside / name).parent.mkdir(exist_ok=True)
        (outside / name).write_bytes(b"not lmcache's")
    files = {n: b"not lmcache's" for n in names}
    frame = next(iter(chunk_files(root).values()))
    tier = LocalDiskBackend(root, 6 * frame, namespace=NEW)
    assert len(tier._orphans) == 4
    swap_for_symlink(root / OLD.hex(), outside)
    put(tier, ChunkFactory(CHUNK), [key(NEW, i) for i in range(6)])  # needs the orphans' room
    assert untouched(outside, files), "reclaim deleted files outside the cache root"
    assert len(tier._orphans) == 0  # forgotten, not followed
    assert tier.contains([key(NEW, i) for i in range(6)]) == [True] * 6
    tier.close()
