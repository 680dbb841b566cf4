#!/usr/bin/env bash
# One host, two containers: lmcache server (MP mode) and vLLM on its socket.
# Docker works the same: PODMAN=docker GPU_FLAGS="--gpus all".
# docs/deployment.md, "A single host". Checked by tests/test_deploy.py, which
# runs this script with a recording PODMAN and starts the server it describes.
set -euo pipefail

PODMAN=${PODMAN:-podman}
# lmcache's images (issue 34, item 2).
# One image for both (deploy/images/): the engine's entrypoint is `vllm serve`,
# the server's `lmcache`. On a CPU host: localhost/lmcache-vllm-cpu:0.1.0.
ENGINE_IMAGE=${ENGINE_IMAGE:-localhost/lmcache-vllm-openai:0.1.0}
SERVER_IMAGE=${SERVER_IMAGE:-$ENGINE_IMAGE}
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}
# The server's DRAM tier, GiB: resident from the start.
ARENA_GIB=${ARENA_GIB:-20}
SOCKET_DIR=${SOCKET_DIR:-/run/lmcache}
CONFIG_DIR=${CONFIG_DIR:-/etc/lmcache}
PORT=${PORT:-8000}
GPU_FLAGS=${GPU_FLAGS:---device nvidia.com/gpu=all}
ENGINE_SHM=${ENGINE_SHM:-8g}

# The socket's directory: writable by its owner only (an engine refuses a
# socket directory another user could write to).
mkdir -p "$SOCKET_DIR" "$CONFIG_DIR"
chmod 0755 "$SOCKET_DIR"
# One cache config for the server and the engine.
cat > "$CONFIG_DIR/cache.yaml" <<EOF
chunk_size: 256
max_local_cpu_size: ${ARENA_GIB}GiB
server_url: unix:///run/lmcache/lmcache.sock
EOF

# The server. Its memory limit is the arena plus 1 GiB; the arena is a memfd
# (not /dev/shm), so no --shm-size. On the host's network only for its admin
# endpoint, which stays on 127.0.0.1: curl localhost:8080/status. The
# entrypoint is set, so an engine image (entrypoint `vllm serve`) works too.
$PODMAN run -d --name lmcache-server --restart=always \
  --network host \
  --memory "$((ARENA_GIB + 1))g" \
  -v "$SOCKET_DIR:/run/lmcache" \
  -v "$CONFIG_DIR/cache.yaml:/etc/lmcache/cache.yaml:ro" \
  --entrypoint lmcache \
  "$SERVER_IMAGE" \
  server --config /etc/lmcache/cache.yaml --socket /run/lmcache/lmcache.sock

# vLLM: the socket's directory read-only and the same cache config. The arena
# comes over the socket, so lmcache needs no --ipc=host; --shm-size is vLLM's
# own (its processes talk through /dev/shm, whose default in a container is
# 64 MiB). vLLM's prefix cache stays on.
# shellcheck disable=SC2086
$PODMAN run -d --name vllm --restart=always \
  $GPU_FLAGS \
  --shm-size "$ENGINE_SHM" \
  -p "$PORT:8000" \
  -v "$SOCKET_DIR:/run/lmcache:ro" \
  -v "$CONFIG_DIR/cache.yaml:/etc/lmcache/cache.yaml:ro" \
  -e LMCACHE_CONFIG_FILE=/etc/lmcache/cache.yaml \
  -e HF_TOKEN \
  "$ENGINE_IMAGE" \
  "$MODEL" --enable-prefix-caching \
  --kv-transfer-config '{"kv_connector":"LMCacheKVConnector","kv_connector_module_path":"lmcache_vllm","kv_role":"kv_both"}'
