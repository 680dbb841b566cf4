"""NIXL storage tier benchmark: put/get of chunks through the tier against a raw NIXL
POSIX-plugin WRITE/READ of the same bytes to the same kind of file.

    python tools/bench_nixl_storage.py [--chunks 16] [--rounds 5] [--dir DIR]

Rounds interleaved (raw, tier, ...), median. Writes are timed until the bytes
are on the disk (fsync of the file) and reads come from the disk (both files
dropped from the page cache first), on both sides, as the figures of the
issue were taken (about 0.9 GB/s write, 1.5 GB/s cold read for the raw plugin).
Prints GB/s and tier / raw for writes and reads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from lmcache_core.keys import CacheKey
from lmcache_core.pool import SlotPool
from lmcache_nixl.storage import NixlStorageBackend

MIB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--chunk-mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    n, nbytes = args.chunks, args.chunk_mib * MIB
    pool = SlotPool.anonymous(nbytes * (2 * n + 2), nbytes)
    rng = np.random.default_rng(0)
    keys = [CacheKey.of(b"bench-nixl-st-16", i.to_bytes(32, "little")) for i in range(n)]
    chunks = []
    for k in keys:
        c = pool.allocate(k, 256, nbytes)
        np.frombuffer(c.view, np.uint8)[:] = rng.integers(1, 255, nbytes, dtype=np.uint8)
        chunks.append(c)
    d = tempfile.mkdtemp(dir=args.dir)
    tier = NixlStorageBackend(os.path.join(d, "tier.bin"), nbytes * (n + 1), nbytes)
    # The raw side: the tier's own agent, its own file, the same descriptors a user would build.
    agent = tier.agent
    raw_path = os.path.join(d, "raw.bin")
    fd = os.open(raw_path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, nbytes * n)
    agent.register_memory([(0, nbytes * n, fd, "")], "FILE")
    tier._register(chunks[0])

    def cold() -> None:
        for f in (fd, tier.fd):
            os.fsync(f)
            os.posix_fadvise(f, 0, 0, os.POSIX_FADV_DONTNEED)

    def raw(op: str) -> float:
        mem = agent.get_xfer_descs([(c.address, nbytes, 0) for c in chunks], "DRAM")
        files = agent.get_xfer_descs([(i * nbytes, nbytes, fd) for i in range(n)], "FILE")
        if op == "READ":
            cold()
        t0 = time.perf_counter()
        h = agent.initialize_xfer(op, mem, files, tier._name)
        state = agent.transfer(h)
        while state not in ("DONE", "ERR"):
            state = agent.check_xfer_state(h)
        if op == "WRITE":
            os.fsync(fd)
        dt = time.perf_counter() - t0
        agent.release_xfer_handle(h)
        assert state == "DONE"
        return dt

    def tier_put() -> float:
        tier.remove(keys)
        t0 = time.perf_counter()
        assert all(tier.put(chunks))
        os.fsync(tier.fd)
        return time.perf_counter() - t0

    def tier_get() -> float:
        cold()
        t0 = time.perf_counter()
        got = tier.get(keys, pool.allocate)
        dt = time.perf_counter() - t0
        assert all(g is not None for g in got)
        for g in got:
            g.release()
        return dt

    samples: dict[str, list[float]] = {k: [] for k in ("rw", "tw", "rr", "tr")}
    raw("WRITE"), tier_put(), raw("READ"), tier_get()  # warm
    for r in range(args.rounds):
        order = [("rw", lambda: raw("WRITE")), ("tw", tier_put)]
        for name, fn in order[:: -1 if r % 2 else 1]:
            samples[name].append(fn())
        order = [("rr", lambda: raw("READ")), ("tr", tier_get)]
        for name, fn in order[:: -1 if r % 2 else 1]:
            samples[name].append(fn())
    t = {k: statistics.median(v) for k, v in samples.items()}
    total = n * nbytes
    for op, a, b in (("write", "rw", "tw"), ("read", "rr", "tr")):
        print(
            f"nixl storage {op}: raw POSIX plugin {total / t[a] / 1e9:.2f} GB/s, tier "
            f"{total / t[b] / 1e9:.2f} GB/s, tier / raw = {t[a] / t[b]:.2f} (target >= 0.8)"
        )
    os.close(fd)
    tier.close()
    for c in chunks:
        c.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
