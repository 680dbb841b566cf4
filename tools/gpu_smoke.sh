#!/usr/bin/env bash
# The GPU path, proven on a GPU in one command (at most five minutes).
#
#   tools/gpu_smoke.sh --prepare     # here, with PyPI: fill .wheels/ (ignored by git)
#   tools/gpu_smoke.sh [OUT_DIR]     # on the GPU machine, no network needed
#
# On a bare GPU machine (python3 with a CUDA torch, nvcc, numpy, pytest,
# hypothesis, xxhash, pyyaml, rich) it builds the kernels with warnings as
# errors for this GPU, runs the gpu-marked tests and the CUDA-vs-reference
# property test (with proof that the kernel path ran), a CacheEngine round trip
# through the pinned arena, the bandwidth benchmark (2 KiB and 256-byte rows,
# against cudaMemcpyAsync) and the layer-wise overlap benchmark, and writes the
# figures to OUT_DIR/gpu_smoke.json (OUT_DIR: $OUT, else ./gpu-smoke-out).
#
# Nothing is installed into the machine's Python: the wheels in .wheels/ that
# it lacks (cffi, pycparser, prometheus-client; our two packages, for their
# entry points) are unpacked into a temporary folder on PYTHONPATH, after the
# working tree's sources, so the code tested is the tree's. Send .wheels/ with
# the tree (the device tool's `carry`).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [[ "${1:-}" == "--prepare" ]]; then
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    rm -rf .wheels && mkdir -p .wheels
    LMCACHE_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps -w .wheels \
        packages/lmcache-core packages/lmcache-cuda
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .wheels pycparser prometheus-client
    for v in 3.10 3.11 3.12 3.13; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: -d .wheels \
            --python-version "$v" --platform manylinux2014_x86_64 cffi
    done
    du -sh .wheels && ls .wheels
    exit 0
fi

OUT_DIR="${1:-${OUT:-$ROOT/gpu-smoke-out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
SITE="$(mktemp -d /tmp/lmcache-gpu-smoke.XXXXXX)"
"$PY" - "$SITE" <<'EOF'
"""Unpack the wheels this Python can use and lacks (a wheel is an installed layout)."""
import importlib.util, sys, zipfile
from pathlib import Path

site = Path(sys.argv[1])
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
wheels = sorted(Path(".wheels").glob("*.whl")) if Path(".wheels").is_dir() else []
want = {"cffi": "cffi", "pycparser": "pycparser", "prometheus_client": "prometheus_client",
        "lmcache_core": None, "lmcache_cuda": None}  # ours: always, for their entry points
for w in wheels:
    name = w.name.split("-")[0]
    if name not in want or (want[name] and importlib.util.find_spec(want[name])):
        continue
    if want[name] and "-cp3" in w.name and f"-{tag}-" not in w.name:
        continue  # a compiled wheel for another Python (ours: only the metadata is used)
    zipfile.ZipFile(w).extractall(site)
    print(f"gpu_smoke: unpacked {w.name}")
EOF
export PYTHONPATH="$ROOT/packages/lmcache-core/src:$ROOT/packages/lmcache-cuda/src:$ROOT/packages/lmcache-server/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export LMCACHE_GPU_SMOKE_OUT="$OUT_DIR"
exec timeout 300 "$PY" "$ROOT/tools/gpu_smoke.py" "$OUT_DIR"
