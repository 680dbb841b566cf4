"""lmcache-nixl's benchmarks: the library code of ``tools/bench_p2p.py`` and
``tools/bench_nixl_storage.py``.

* :func:`run_p2p_benchmark`: chunks pulled from a peer process through the p2p
  tier, against a raw NIXL read of the same bytes between the same two
  processes. A private redis-server is the index; the peer is
  ``python -m lmcache_nixl.bench p2p-peer URL N`` (:func:`serve_p2p_peer`),
  which stores ``N`` chunks of 16 MiB (256 tokens of a 16-layer, 8-head, head
  size 128, bf16 cache). Rounds interleaved (raw, tier, ...): the index
  lookup, peer liveness, NIXL read, then the slots' generation words; with
  ``checksums`` both sides run with ``p2p_verify_checksums`` and every pulled
  byte is hashed too.
* :func:`run_storage_benchmark`: the NIXL storage tier's ``put``/``get``
  against a raw NIXL POSIX-plugin WRITE/READ of the same bytes to the same kind
  of file. Writes are timed until the bytes are on the disk (fsync of the
  file) and reads come from the disk (both files dropped from the page cache
  first), on both sides.

Each returns GB/s of both sides and tier / raw (target >= 0.8).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.keys import CacheKey
from lmcache_core.pool import SlotPool
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_core.testing.servers import RedisServer
from lmcache_core.transport import Region

MIB = 1 << 20

LAYOUT = KVLayout("vllm_flash", "bfloat16", 16, 8, 128, 16)
CHUNK = 256


def config(url: str, cpu: str, checksums: bool = False) -> CacheConfig:
    return CacheConfig.from_dict(
        {
            "p2p_verify_checksums": checksums,
            "chunk_size": CHUNK,
            "max_local_cpu_size": cpu,
            "enable_p2p": True,
            "p2p_index_url": url,
            "blocking_timeout_secs": 30,
        }
    )


def prompt(i: int) -> list[int]:
    return [i * 100_000 + t for t in range(CHUNK)]


def serve_p2p_peer(url: str, n: int, checksums: bool) -> None:
    """The peer process: stores ``n`` chunks, publishes them, serves until stdin closes."""
    engine = CacheEngine(
        config(url, f"{(n + 4) * 16}MiB", checksums), model="bench/p2p", layout=LAYOUT
    )
    src = PagedKVMemory(LAYOUT, num_blocks=CHUNK // 16 + 4, seed=1)
    for i in range(n):
        engine.store(prompt(i), src.kv(src.table(CHUNK, i)))
    engine.flush(60)
    print("READY", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    engine.close()


def run_p2p_benchmark(n: int = 16, rounds: int = 5, checksums: bool = False) -> dict:
    """``n`` chunks pulled from a peer process: a raw NIXL read of the peer's regions
    against the p2p tier's ``get`` of the same keys, rounds interleaved, medians.

    Both sides run as production does, with a deployment secret (the p2p index
    refuses to start without one): ``LMCACHE_AUTH_SECRET`` if set, else a random
    one, which the peer inherits."""
    import secrets

    os.environ.setdefault("LMCACHE_AUTH_SECRET", secrets.token_hex(32))
    with RedisServer() as redis:
        peer = subprocess.Popen(
            [sys.executable, "-m", "lmcache_nixl.bench", "p2p-peer", redis.url, str(n)]
            + (["--checksums"] if checksums else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in peer.stdout:
            if line.strip() == "READY":
                break
        else:
            raise RuntimeError(f"the p2p peer exited ({peer.wait()}) before it was ready")
        try:
            engine = CacheEngine(
                config(redis.url, f"{(n + 4) * 16}MiB", checksums),
                model="bench/p2p",
                layout=LAYOUT,
            )
            p2p = engine.tiers[1].backend
            keys = [engine.keys(engine.spans(prompt(i)))[0] for i in range(n)]
            entries = p2p.index.lookup(keys)
            assert all(e is not None for e in entries), "the peer did not publish every chunk"
            peer_id = entries[0].peer
            p2p.transport.connect(p2p.index.peers([peer_id])[peer_id])
            pool = engine.pool
            total = sum(e.nbytes for e in entries)

            def raw() -> float:
                chunks = [pool.allocate(k, CHUNK, e.nbytes) for k, e in zip(keys, entries)]
                pairs = [
                    (Region(c.address, c.nbytes), Region(e.address, e.nbytes))
                    for c, e in zip(chunks, entries)
                ]
                t0 = time.perf_counter()
                p2p.transport.read(peer_id, pairs, timeout=60)
                dt = time.perf_counter() - t0
                for c in chunks:
                    c.release()
                return dt

            def tier() -> float:
                t0 = time.perf_counter()
                got = p2p.get(keys, pool.allocate)
                dt = time.perf_counter() - t0
                assert all(c is not None for c in got), "a p2p read missed"
                for c in got:
                    c.release()
                return dt

            raw()
            tier()  # warm the connection
            r_t, t_t = [], []
            for r in range(rounds):
                for fn, out in ((raw, r_t), (tier, t_t))[:: -1 if r % 2 else 1]:
                    out.append(fn())
            raw_s, tier_s = statistics.median(r_t), statistics.median(t_t)
            engine.close()
            result = {
                "chunks": n,
                "chunk_bytes": total // n,
                "raw_gbps": total / raw_s / 1e9,
                "tier_gbps": total / tier_s / 1e9,
                "tier_over_raw": raw_s / tier_s,
                "checksums": checksums,
            }
        finally:
            peer.stdin.close()
            peer.wait(30)
    return result


def run_storage_benchmark(
    chunks: int = 16, chunk_mib: int = 16, rounds: int = 5, directory: str | None = None
) -> dict[str, dict[str, float]]:
    """NIXL storage tier ``put``/``get`` against raw POSIX-plugin WRITE/READ of the same
    bytes to the same kind of file, rounds interleaved, medians; per op (write, read)."""
    from lmcache_nixl.storage import NixlStorageBackend

    n, nbytes = chunks, chunk_mib * MIB
    pool = SlotPool.anonymous(nbytes * (2 * n + 2), nbytes)
    rng = np.random.default_rng(0)
    keys = [CacheKey.of(b"bench-nixl-st-16", i.to_bytes(32, "little")) for i in range(n)]
    chunks = []
    for k in keys:
        c = pool.allocate(k, 256, nbytes)
        np.frombuffer(c.view, np.uint8)[:] = rng.integers(1, 255, nbytes, dtype=np.uint8)
        chunks.append(c)
    d = tempfile.mkdtemp(dir=directory)
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
    for r in range(rounds):
        order = [("rw", lambda: raw("WRITE")), ("tw", tier_put)]
        for name, fn in order[:: -1 if r % 2 else 1]:
            samples[name].append(fn())
        order = [("rr", lambda: raw("READ")), ("tr", tier_get)]
        for name, fn in order[:: -1 if r % 2 else 1]:
            samples[name].append(fn())
    t = {k: statistics.median(v) for k, v in samples.items()}
    total = n * nbytes
    result = {
        op: {
            "raw_gbps": total / t[a] / 1e9,
            "tier_gbps": total / t[b] / 1e9,
            "tier_over_raw": t[a] / t[b],
        }
        for op, a, b in (("write", "rw", "tw"), ("read", "rr", "tr"))
    }
    os.close(fd)
    tier.close()
    for c in chunks:
        c.release()
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m lmcache_nixl.bench p2p-peer URL N [--checksums]``: the benchmark's peer."""
    import argparse

    ap = argparse.ArgumentParser(description="the p2p benchmark's peer process")
    ap.add_argument("what", choices=["p2p-peer"])
    ap.add_argument("url")
    ap.add_argument("n", type=int)
    ap.add_argument("--checksums", action="store_true")
    args = ap.parse_args(argv)
    serve_p2p_peer(args.url, args.n, args.checksums)
    return 0


if __name__ == "__main__":
    sys.exit(main())
