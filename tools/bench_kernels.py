"""Kernel benchmark: C (and, with a GPU, CUDA) gather/scatter vs a plain copy of the same bytes.

    python tools/bench_kernels.py [--json FILE]

Prints, for a 256-token chunk of a Llama-3-8B-shaped cache, the GB/s of each
and the ratio to memcpy (CPU) or cudaMemcpyAsync (CUDA), measured in one run.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmcache_cuda.bench import LLAMA3_8B_CPU, LLAMA3_8B_FLASH, bench_cpu, bench_cuda
from lmcache_cuda.pinned import cuda_device_count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    out: dict[str, dict] = {}
    for name, layout in (("cpu/vllm_flash", LLAMA3_8B_FLASH), ("cpu/vllm_cpu", LLAMA3_8B_CPU)):
        r = bench_cpu(layout, rounds=args.rounds)
        out[name] = r
        print(
            f"{name:16} chunk {r['chunk_bytes'] / 2**20:.0f} MiB"
            f"  memcpy {r['memcpy_gbps']:.2f} GB/s"
            f" | C gather {r['c_gather_gbps']:.2f} ({r['c_gather_vs_memcpy']:.2f}x)"
            f"  C scatter {r['c_scatter_gbps']:.2f} ({r['c_scatter_vs_memcpy']:.2f}x)"
            f" | 1 thread {r['c1_gather_vs_memcpy']:.2f}x/{r['c1_scatter_vs_memcpy']:.2f}x"
            f" | numpy gather {r['numpy_gather_vs_memcpy']:.2f}x"
            f" scatter {r['numpy_scatter_vs_memcpy']:.2f}x | correct {bool(r['correct'])}"
        )
    if cuda_device_count():
        r = bench_cuda(rounds=args.rounds)
        out["cuda/vllm_flash"] = r
        print(
            f"cuda/vllm_flash  gather {r['cuda_gather_gbps']:.1f} GB/s"
            f" ({r['gather_vs_memcpy_d2h']:.2f}x of cudaMemcpyAsync D2H"
            f" {r['memcpy_d2h_gbps']:.1f}); scatter {r['cuda_scatter_gbps']:.1f} GB/s"
            f" ({r['scatter_vs_memcpy_h2d']:.2f}x of H2D {r['memcpy_h2d_gbps']:.1f})"
        )
    else:
        print("cuda: no GPU here; CUDA figures need a GPU machine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(v.get("correct", 1) for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
