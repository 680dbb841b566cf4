"""A vLLM CPU smoke run by the venv the release wheels were installed into (test_wheels.py).

``python wheel_smoke.py MODEL_DIR`` prints ``RESULT {json}``: where lmcache's
packages were imported from, a cold generation, the same prompt again (vLLM's
own prefix cache off, so only lmcache can serve it) and the tokens lmcache
loaded for it. Nothing from the repository is imported: only what the wheels
installed.
"""

from __future__ import annotations

import json
import os
import random
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("LMCACHE_MAX_LOCAL_CPU_SIZE", "256MiB")


def main(model: str) -> dict:
    import lmcache_core
    import lmcache_cuda
    import lmcache_vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model,
        enforce_eager=True,
        max_model_len=2048,
        dtype="float32",
        seed=0,
        enable_prefix_caching=False,
        kv_transfer_config={
            # vLLM's built-in name, as production-stack sets it: the `lmcache` shim
            # (the meta-package's wheel) answers it with lmcache-vllm.
            "kv_connector": "LMCacheConnectorV1",
            "kv_role": "kv_both",
        },
    )
    from lmcache_vllm.connector import WORKERS

    (worker,) = WORKERS
    metrics = worker.engine.metrics
    rnd = random.Random(7)
    prompt = TokensPrompt(prompt_token_ids=[rnd.randrange(2, 4000) for _ in range(600)])
    params = SamplingParams(temperature=0.0, max_tokens=8)

    def gen() -> list[int]:
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        return list(out.outputs[0].token_ids)

    before = metrics.get("lmcache:num_hit_tokens")
    cold = gen()
    assert worker.engine.flush(30)
    middle = metrics.get("lmcache:num_hit_tokens")
    hit = gen()
    return {
        "files": {m.__name__: m.__file__ for m in (lmcache_core, lmcache_cuda, lmcache_vllm)},
        "cold": cold,
        "hit": hit,
        "loaded_cold": middle - before,
        "loaded_hit": metrics.get("lmcache:num_hit_tokens") - middle,
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
    os._exit(0)  # skip vLLM's slow teardown
