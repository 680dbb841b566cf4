"""Make a test model: a small random-weight Llama (or another family), or the real SmolLM2.

The command line of :func:`lmcache_vllm.testing.models.ensure_model` (see its
module for the presets and why ``--init-std`` matters):

    python tools/make_test_model.py --out /tmp/tiny-llama --preset tiny
    python tools/make_test_model.py --out /tmp/tiny-peaked --preset tiny --init-std 0.3
    python tools/make_test_model.py --out /tmp/llama-200m --preset bench
    python tools/make_test_model.py --out /tmp/smollm2 --preset smollm2
    python tools/make_test_model.py --out /tmp/tiny-qwen3 --preset tiny --family qwen3
"""

from __future__ import annotations

import argparse

from lmcache_vllm.testing.models import FAMILIES, PRESETS, ensure_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=[*sorted(PRESETS), "smollm2"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    args = ap.parse_args()
    path = ensure_model(args.out, args.preset, args.seed, args.init_std, args.family)
    print(path)


if __name__ == "__main__":
    main()
