"""The benchmarks run, check their own bytes, and report every figure (timings are not asserted)."""

from __future__ import annotations

import json

from lmcache_core.bench.core import run_core_benchmark
from lmcache_core.bench.tiers import run_tier_benchmark
from lmcache_core.cli import main


def test_tier_benchmark_measures_both_tiers_and_checks_bytes(tmp_path):
    r = run_tier_benchmark(chunk_mib=0.25, chunks=4, rounds=2, disk_dir=str(tmp_path))
    assert r.correct
    assert set(r.times) == {
        ("disk", "write"),
        ("disk", "read"),
        ("redis", "write"),
        ("redis", "read"),
        ("redis+auth", "write"),
        ("redis+auth", "read"),
        ("redis+encrypt", "write"),
        ("redis+encrypt", "read"),
    }
    assert all(raw > 0 and ours > 0 for raw, ours in r.times.values())
    assert not list(tmp_path.iterdir()), "the benchmark cleans up its files"


def test_bench_tiers_cli_prints_ratios_as_json(capsys, tmp_path):
    rc = main(
        ["bench", "tiers", "--tiers", "disk", "--chunks", "2", "--chunk-mib", "0.1",
         "--rounds", "1", "--dir", str(tmp_path), "--json"]
    )  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["correct"] is True
    assert {"disk_write", "disk_read"} <= set(out)
    assert out["disk_read"]["ratio"] > 0


def test_bench_tiers_rejects_an_unknown_tier(capsys):
    assert main(["bench", "tiers", "--tiers", "tape"]) == 2
    assert "disk and/or redis" in capsys.readouterr().out


def test_core_benchmark_checks_bytes():
    r = run_core_benchmark(chunks=2, rounds=1)
    assert r.correct
    assert r.store_s > 0 and r.retrieve_s > 0
