"""The soak's checks on made-up reports (the real soak is lmcache-vllm's test_vllm_soak.py)."""

from __future__ import annotations

import math
import subprocess
import sys

from lmcache_core.bench.loadgen import Sample
from lmcache_core.bench.soak import SoakReport, group_rss, problems, second_half_growth

BPT = 1000  # KV bytes per token


def scrape(**over: float) -> dict:
    base = {
        ("lmcache:num_hit_tokens", ()): 500.0,
        ("lmcache:num_requested_tokens", ()): 800.0,
        ("lmcache:num_lookup_hits", ()): 600.0,
        ("lmcache:num_lookup_tokens", ()): 900.0,
        ("lmcache:num_stored_tokens", ()): 1000.0,
        ("lmcache:num_promotions", (("tier", "disk"),)): 2.0,
        ("lmcache:stored_bytes", (("tier", "cpu"),)): 1000.0 * BPT + 256 * BPT,
        ("lmcache:stored_bytes", (("tier", "disk"),)): 1000.0 * BPT,
        ("lmcache:usage_bytes", (("tier", "cpu"),)): 10.0,
        ("lmcache:capacity_bytes", (("tier", "cpu"),)): 100.0,
        ("lmcache:pinned_chunks", (("tier", "cpu"),)): 0.0,
        ("lmcache:retrieved_bytes", (("tier", "redis"),)): 0.0,
        ("lmcache:tier_healthy", (("path", "read"), ("tier", "redis"))): 1.0,
        ("lmcache:tier_healthy", (("path", "write"), ("tier", "redis"))): 1.0,
        ("process_resident_memory_bytes", ()): 100.0,
    }
    for name, v in over.items():
        key = next(k for k in base if k[0] in (f"lmcache:{name}", name))
        base[key] = v
    return base


def report(end: dict, rss: list[int], failed: int = 0) -> SoakReport:
    samples = [Sample(0, 0, 0.0, error="HTTP 500" if i < failed else None) for i in range(10)]
    timeline = [
        (float(i), 2 * r, scrape(process_resident_memory_bytes=r)) for i, r in enumerate(rss)
    ]
    summary = {"requests": 10, "failed": failed, "duration_s": float(len(rss))}
    return SoakReport(summary, samples, timeline, [], end)


def test_a_clean_soak_passes():
    assert problems(report(scrape(), [100, 150] + [200] * 7 + [201]), kv_bytes_per_token=BPT) == []


def test_each_check_can_fail():
    flat = [100] + [200] * 9
    cases = {
        "requests failed": report(scrape(), flat, failed=2),
        "grew": report(scrape(), [100] + [200] * 5 + [210, 215, 220, 220]),
        "still pinned": report(scrape(pinned_chunks=3), flat),
        "retrieved 900 tokens of 800": report(scrape(num_hit_tokens=900), flat),
        "no token was retrieved": report(scrape(num_hit_tokens=0), flat),
        "do not match": report(scrape(num_stored_tokens=1300), flat),
        "bytes stored do not match": report(scrape(num_promotions=0), flat),
        "above its capacity": report(scrape(usage_bytes=101), flat),
    }
    for words, r in cases.items():
        found = problems(r, kv_bytes_per_token=BPT)
        assert any(words in p for p in found), (words, found)


def test_growth_is_judged_against_the_engine_alone():
    r = report(scrape(), [100] + [200] * 5 + [210, 215, 220, 220])  # +10%
    assert any("grew 10.0%" in p for p in problems(r, kv_bytes_per_token=BPT))
    assert problems(r, kv_bytes_per_token=BPT, baseline_rss_growth=0.09) == []
    found = problems(r, kv_bytes_per_token=BPT, baseline_rss_growth=0.05)
    assert any("5.0% of the engine alone + 2%" in p for p in found)


def test_a_tier_that_never_served_again_after_its_fault_fails():
    end = scrape()
    r = report(end, [100] + [200] * 9)
    found = problems(r, kv_bytes_per_token=BPT, recovered_tier="redis", recovered_at_s=5)
    assert any("redis served no hit" in p for p in found)
    end[("lmcache:retrieved_bytes", (("tier", "redis"),))] = 5.0
    end[("lmcache:num_hit_tokens", ())] = 700.0
    end[("lmcache:tier_healthy", (("path", "write"), ("tier", "redis")))] = 0.0
    found = problems(r, kv_bytes_per_token=BPT, recovered_tier="redis", recovered_at_s=5)
    assert found == ["tier redis is still marked unhealthy at the end"]


def test_group_rss_counts_every_process_of_the_group():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"],
        start_new_session=True,
    )
    try:
        for _ in range(100):
            rss = group_rss(child.pid)
            if rss > 64 << 20:
                break
            subprocess.run(["sleep", "0.1"])
        assert rss > 64 << 20  # the child's 64 MiB buffer
        assert group_rss(2**22 + 12345) == 0  # no such group
    finally:
        child.kill()
        child.wait()


def test_process_memory_splits_a_process_rss_as_the_kernel_does():
    import mmap
    import os

    from lmcache_core.bench.soak import process_memory

    before = process_memory(os.getpid())
    shared = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_SHARED)
    shared.write(b"x" * (64 << 20))  # 64 MiB of shared memory, touched
    after = process_memory(os.getpid())
    assert after["shmem"] - before["shmem"] >= 60 << 20  # counted as shared, not own heap
    assert after["anon"] - before["anon"] < 16 << 20
    assert after["rss"] >= after["anon"] + after["shmem"]
    shared.close()
    assert process_memory(2**22 + 12345) == {}  # no such process


def test_growth_survives_a_sampling_gap():
    """A window the sampler missed (starved for 20 s) reads its nearest sample, not NaN."""
    # duration 100: nothing in [50, 60) nor in [90, 100).
    first_half = [(float(t), 200.0) for t in range(0, 50, 3)]
    assert second_half_growth([*first_half, (62.0, 200.0), (88.0, 200.0)], 100.0) == 0.0
    assert second_half_growth([*first_half, (62.0, 200.0), (88.0, 300.0)], 100.0) == 0.5
    assert math.isnan(second_half_growth(first_half, 100.0))  # no sample in the second half


def test_a_gap_never_hides_a_leak():
    """A steady leak with most of the second half unsampled: growth measured over at least
    a quarter of the run, or NaN (a failure), never a shrunken figure that passes."""
    leak = [(float(t), 1000.0 + 10 * t) for t in range(0, 101)]
    full = second_half_growth(leak, 100.0)
    assert full > 0.2
    for gap in [(50, 88), (50, 95), (52, 100), (60, 100), (0, 100)]:
        kept = [(t, v) for t, v in leak if not gap[0] <= t < gap[1]]
        g = second_half_growth(kept, 100.0)
        assert math.isnan(g) or g > 0.1, (gap, g)  # NaN fails `growth < bound` too
    one = [(t, v) for t, v in leak if t < 50 or t == 70.0]  # one second-half sample
    assert math.isnan(second_half_growth(one, 100.0))
