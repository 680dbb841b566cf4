#!/usr/bin/env bash
# Set up (if needed) and run the main job.
#
# Until the vLLM adapter lands (issue #3), the main job is the core benchmark:
# KV chunks of a Llama-3-8B-shaped cache stored into and retrieved from the
# CPU tier, against memcpy of the same bytes, and the cost of looking up a
# 128K-token prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/lmcache bench core "$@"
