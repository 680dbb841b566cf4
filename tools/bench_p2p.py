"""P2P tier benchmark: chunks pulled from a peer process through the p2p tier, against a raw
NIXL read of the same bytes between the same two processes.

The driver of :func:`lmcache_nixl.bench.run_p2p_benchmark`.

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
import json
import sys

from lmcache_nixl.bench import run_p2p_benchmark


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--checksums", action="store_true", help="hash every pulled byte (p2p_verify_checksums)"
    )
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    r = run_p2p_benchmark(args.chunks, args.rounds, args.checksums)
    print(
        f"{r['chunks']} chunks of {r['chunk_bytes'] / 2**20:.0f} MiB from a peer process: raw "
        f"NIXL read {r['raw_gbps']:.2f} GB/s, p2p tier {r['tier_gbps']:.2f} GB/s, "
        f"tier / raw = {r['tier_over_raw']:.2f} (target >= 0.8)"
        + (" [checksums on]" if args.checksums else "")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
