"""The bench wing: lmcache-core's benchmarks and its serving-level load tools.

Nothing on the cache's data path imports this package; the conformance suites
(:mod:`lmcache_core.testing`) do not either. Two kinds of module live here:

* benchmarks of core itself, each a ratio against a baseline measured in the
  same run: :mod:`~lmcache_core.bench.core` (the CPU tier against memcpy, the
  lookup of a 128K-token prompt; ``lmcache bench core``) and
  :mod:`~lmcache_core.bench.tiers` (disk and Redis tiers against raw file I/O
  and raw redis-py; ``lmcache bench tiers``);
* clients of any OpenAI-compatible server, which never touch the cache:
  :mod:`~lmcache_core.bench.client` (one streamed request, timed; failures
  reported with the server's own words), :mod:`~lmcache_core.bench.workload`
  (synthetic documents, long-document QA), :mod:`~lmcache_core.bench.loadgen`
  (many users, many rounds, concurrency or a request rate),
  :mod:`~lmcache_core.bench.probes` (single-request baselines beside a load
  run), :mod:`~lmcache_core.bench.soak` (load for minutes, faults injected, what
  must hold), :mod:`~lmcache_core.bench.scrape` (a ``/metrics`` page read back)
  and :mod:`~lmcache_core.bench.serve` (``lmcache bench serve`` and ``lmcache
  bench plot``: tables, JSON and SVG).

The rule for every package (docs/benchmarks.md): a benchmark's library code
lives in its package's ``bench`` module, the drivers people run in ``tools/``.
"""
