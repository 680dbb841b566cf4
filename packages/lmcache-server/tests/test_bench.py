"""The server's core benchmark runs, checks its bytes and reports a ratio per path."""

from __future__ import annotations

from lmcache_core.layout import KVLayout
from lmcache_server.bench import run_server_core_benchmark


def test_the_server_benchmark_round_trips_bytes_and_reports_every_path():
    small = KVLayout("vllm_flash", "bfloat16", 2, 2, 64, 16)
    r = run_server_core_benchmark(chunks=2, rounds=2, layout=small, chunk_size=64)
    d = r.as_dict()
    assert d["bytes_equal"] is True
    assert set(d["vs_memcpy"]) == {"local_store", "local_load", "server_store", "server_load"}
    assert all(v > 0 for v in d["vs_memcpy"].values())
    assert len(r.times["server_load"]) == 2
