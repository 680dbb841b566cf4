"""lmcache-vllm's benchmarks: the library code of the vLLM benchmark drivers in ``tools/``.

Each module measures one thing and returns its figures, every one against a
baseline measured in the same run; the drivers (``tools/bench_*.py``) parse
arguments, pick the model and dtype (:mod:`lmcache_vllm.testing.tool_args`),
print and exit non-zero when a request failed:

* :mod:`~lmcache_vllm.bench.servers`: the server configurations the serving
  benchmarks compare (vLLM alone, lmcache with DRAM, over disk, vLLM's own
  offloading), and a start that reports why a server did not come up;
* :mod:`~lmcache_vllm.bench.store_cost`: what storing adds to an uncached
  request, paired A/B (``tools/bench_store_cost.py``);
* :mod:`~lmcache_vllm.bench.cached_tail`: what a cached request still costs:
  TTFT against the tail the engine recomputes (``tools/bench_cached_tail.py``);
* :mod:`~lmcache_vllm.bench.blend`: non-prefix reuse, answer quality and TTFT
  against a full prefill (``tools/bench_blend.py``);
* :mod:`~lmcache_vllm.bench.pd`: disaggregated prefill, decode TTFT against a
  single instance (``tools/bench_pd.py``);
* :mod:`~lmcache_vllm.bench.mp`: MP mode (the host's ``lmcache server``) against
  in-process lmcache and vLLM alone (``tools/bench_server.py``);
* :mod:`~lmcache_vllm.bench.upstream_mp`: MP mode against upstream LMCache 0.5.6's
  and vLLM alone (``tools/bench_upstream_mp.py``).

The main job (``tools/bench_vllm.py``) and the load runs
(``tools/bench_load.py``) measure with lmcache-core's bench wing, which talks
to any OpenAI-compatible server: :mod:`lmcache_core.bench.paired`,
:mod:`lmcache_core.bench.loadgen`, :mod:`lmcache_core.bench.probes`.
"""
