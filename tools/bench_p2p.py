"""P2P tier benchmark: chunks pulled from a peer process through the p2p tier, against a raw
NIXL read of the same bytes between the same two processes.

    python tools/bench_p2p.py [--chunks 16] [--rounds 5] [--checksums]

Starts a private redis-server (the index) and a peer process that stores
``--chunks`` chunks of 16 MiB (256 tokens of a 16-layer, 8-head, head size
128, bf16 cache). This process then, rounds interleaved: (raw) reads the
peer's regions with its NIXL agent into its own arena, one batch; (tier) gets
the same keys through the p2p tier (index lookup, peer liveness, NIXL read,
then the slots' generation words; with ``--checksums`` both sides run with
``p2p_verify_checksums`` and every pulled byte is hashed too). Prints GB/s and
tier / raw.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_core.testing.servers import RedisServer
from lmcache_core.transport import Region

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


def serve(url: str, n: int, checksums: bool) -> None:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--checksums", action="store_true", help="hash every pulled byte (p2p_verify_checksums)"
    )
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.checksums)
        return 0
    n = args.chunks
    with RedisServer() as redis:
        peer = subprocess.Popen(
            [sys.executable, __file__, "--serve", redis.url, str(n)]
            + (["--checksums"] if args.checksums else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in peer.stdout:
            if line.strip() == "READY":
                break
        try:
            engine = CacheEngine(
                config(redis.url, f"{(n + 4) * 16}MiB", args.checksums),
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
            for r in range(args.rounds):
                for fn, out in ((raw, r_t), (tier, t_t))[:: -1 if r % 2 else 1]:
                    out.append(fn())
            raw_s, tier_s = statistics.median(r_t), statistics.median(t_t)
            print(
                f"{n} chunks of {total // n / 2**20:.0f} MiB from a peer process: raw NIXL read "
                f"{total / raw_s / 1e9:.2f} GB/s, p2p tier {total / tier_s / 1e9:.2f} GB/s, "
                f"tier / raw = {raw_s / tier_s:.2f} (target >= 0.8)"
                + (" [checksums on]" if args.checksums else "")
            )
            engine.close()
        finally:
            peer.stdin.close()
            peer.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
