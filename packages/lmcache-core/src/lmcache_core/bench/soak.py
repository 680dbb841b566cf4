"""A soak: load against a server for a while, faults injected, then what must hold.

Engine-agnostic: it talks HTTP to an OpenAI-compatible server (the load
generator of :mod:`lmcache_core.bench.loadgen`, with ``duration_s``), reads the
server's processes from ``/proc`` (resident memory of its process group) and
lmcache's own exporter (live values, not the per-step copies an engine
forwards). ``tools/soak.py`` runs it for ten minutes against vLLM; a two-minute
version runs in lmcache-vllm's tests.

What it checks (:func:`problems`): no failed request; resident memory of the
process holding lmcache flat over the second half of the run; no chunk pinned
and no pin expired at the end; the counters agree with each other (tokens
retrieved never exceed tokens asked for, bytes stored in the DRAM tier are
tokens stored, plus promoted chunks, times the KV bytes per token, no tier
above its capacity, no corrupt chunk); and after a tier came back from a
fault, it serves hits again.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcache_core.bench.loadgen import LoadSpec, Sample, run_load, summarize
from lmcache_core.bench.scrape import scrape_samples

#: (metric name, sorted label items) -> value
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_labeled(url: str) -> Scrape:
    """Every ``lmcache:*`` sample of a ``/metrics`` page, and the process's resident memory."""
    return scrape_samples(url, ("lmcache:", "process_resident_memory"))


def value(scrape: Scrape, name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in scrape.items() if n == name and want <= set(lab))


def tiers(scrape: Scrape) -> list[str]:
    return sorted({dict(lab)["tier"] for (n, lab) in scrape if dict(lab).get("tier")})


def _group_processes(pgid: int) -> dict[int, int]:
    """pid -> resident bytes of every process in process group ``pgid``."""
    page = os.sysconf("SC_PAGE_SIZE")
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            # Fields after the command (which may hold spaces) start after the last ')'.
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            out[int(d.name)] = int((d / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
    return out


def process_memory(pid: int) -> dict[str, int]:
    """Resident bytes of one process, split as the kernel does (``/proc/PID/status``):
    ``rss``, ``anon`` (its own heap and stacks: where a leak grows), ``shmem`` (shared
    memory it maps, e.g. an lmcache server's arena), ``file``; empty if it is gone."""
    names = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem", "RssFile": "file"}
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in names:
                out[names[key]] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return {}
    return out


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group ``pgid`` (a server and its workers)."""
    return sum(_group_processes(pgid).values())


@dataclass
class Fault:
    """At ``at_s`` seconds into the run, call ``action`` (in a thread); ``name`` for the log."""

    at_s: float
    name: str
    action: Callable[[], None]


@dataclass
class SoakReport:
    summary: dict[str, Any]
    samples: list[Sample]
    #: (seconds into the run, group RSS bytes, lmcache scrape)
    timeline: list[tuple[float, int, Scrape]] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)
    end: Scrape = field(default_factory=dict)  # after the load, pins settled

    def at(self, t_s: float) -> tuple[float, int, Scrape]:
        """The first timeline point at or after ``t_s``."""
        for point in self.timeline:
            if point[0] >= t_s:
                return point
        return self.timeline[-1]

    def rss_growth_second_half(self, of: str = "cache") -> float:
        """Growth of resident memory over the second half (:func:`second_half_growth`).

        ``of="cache"``: the process that holds lmcache (its exporter's
        ``process_resident_memory_bytes``; without lmcache, the group's largest
        process, the engine's worker); ``"group"``: the server's whole process
        group (its HTTP front end too).
        """
        points = [
            (t, rss if of == "group" else value(scrape, "process_resident_memory_bytes"))
            for t, rss, scrape in self.timeline
        ]
        return second_half_growth(points, self.summary["duration_s"])


def second_half_growth(points: list[tuple[float, float]], duration_s: float) -> float:
    """The median of the samples in the last tenth of a run over the median of those in
    the tenth after its middle, minus 1.

    Medians, since one engine step's activations move RSS by tens of MB from
    one sample to the next. A window without samples (the sampler starved on a
    busy two-core machine for 24 s once, in CI) takes the sample nearest it
    from its own side of the second half: the early one from before 0.9 of the
    run, the late one from after 0.6. The two must still lie a quarter of the
    run apart, or a gap would shrink a leak's growth towards zero; NaN
    otherwise (and without samples), which the soak reports as a failure.
    """
    d = duration_s

    def window(lo: float, hi: float, side: tuple[float, float]) -> list[tuple[float, float]]:
        inside = [(t, v) for t, v in points if lo * d <= t < hi * d]
        if inside:
            return inside
        near = [(t, v) for t, v in points if side[0] * d <= t < side[1] * d]
        middle = (lo + hi) / 2 * d
        return [min(near, key=lambda p: abs(p[0] - middle))] if near else []

    early = window(0.5, 0.6, (0.5, 0.9))
    late = window(0.9, 1.0, (0.6, float("inf")))
    if not early or not late or max(t for t, _ in early) + 0.25 * d > min(t for t, _ in late):
        return float("nan")
    e, l_ = statistics.median(v for _, v in early), statistics.median(v for _, v in late)
    return float("nan") if e == 0 else l_ / e - 1


def largest_process_rss(pgid: int) -> int:
    """Resident bytes of the largest process in group ``pgid`` (an engine's worker)."""
    return max((rss for rss in _group_processes(pgid).values()), default=0)


def _sample(metrics_url: str | None, pgid: int) -> Scrape:
    if metrics_url is None:  # no lmcache: the worker's memory from /proc
        return {("process_resident_memory_bytes", ()): float(largest_process_rss(pgid))}
    return scrape_labeled(metrics_url)


async def _soak(
    base_url: str,
    metrics_url: str | None,
    spec: LoadSpec,
    pgid: int,
    faults: list[Fault],
    every_s: float,
) -> SoakReport:
    timeline: list[tuple[float, int, Scrape]] = []
    done_faults: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    stop = asyncio.Event()

    async def sampler() -> None:
        while True:
            scrape = await asyncio.to_thread(_sample, metrics_url, pgid)
            timeline.append((time.perf_counter() - t0, group_rss(pgid), scrape))
            try:
                await asyncio.wait_for(stop.wait(), every_s)
                return
            except asyncio.TimeoutError:  # 3.10: not the builtin TimeoutError
                pass

    async def injector() -> None:
        for f in sorted(faults, key=lambda f: f.at_s):
            delay = f.at_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            await asyncio.to_thread(f.action)
            done_faults.append((time.perf_counter() - t0, f.name))

    tasks = [asyncio.create_task(sampler()), asyncio.create_task(injector())]
    samples, wall, _ = await run_load(base_url, spec)
    stop.set()
    await tasks[0]
    await tasks[1]  # faults scheduled after the load still run (a restart must happen)
    timeline.append((time.perf_counter() - t0, group_rss(pgid), _sample(metrics_url, pgid)))
    return SoakReport(summarize(samples, wall), samples, timeline, done_faults)


def run_soak(
    base_url: str,
    metrics_url: str | None,
    spec: LoadSpec,
    pgid: int,
    faults: list[Fault] = (),  # type: ignore[assignment]
    every_s: float = 5.0,
    settle_s: float = 30.0,
) -> SoakReport:
    """Run ``spec`` (with ``duration_s``) against ``base_url``; sample memory and metrics.

    After the load, waits up to ``settle_s`` for the pins to return to zero
    (a request's pins go when vLLM reports it finished, a step later).
    ``metrics_url`` None: a server without lmcache (a baseline): memory only.
    """
    if spec.duration_s is None:
        raise ValueError("a soak needs LoadSpec.duration_s")
    report = asyncio.run(_soak(base_url, metrics_url, spec, pgid, list(faults), every_s))
    if metrics_url is None:
        return report
    deadline = time.monotonic() + settle_s
    while True:
        report.end = scrape_labeled(metrics_url)
        if value(report.end, "lmcache:pinned_chunks") == 0 or time.monotonic() > deadline:
            return report
        time.sleep(1)


def problems(
    report: SoakReport,
    *,
    kv_bytes_per_token: int,
    chunk_size: int = 256,
    max_rss_growth: float = 0.02,
    baseline_rss_growth: float = 0.0,
    recovered_tier: str | None = None,
    recovered_at_s: float | None = None,
) -> list[str]:
    """What went wrong, each as a sentence; empty when the soak passed.

    ``baseline_rss_growth``: how much the engine's worker grew without lmcache
    under the same load (vLLM's own does, by several percent in ten minutes
    here); lmcache may add ``max_rss_growth`` to it.
    """
    out: list[str] = []
    s, end = report.summary, report.end
    if s["failed"]:
        errors = sorted({x.error or "" for x in report.samples if x.error})
        out.append(f"{s['failed']} of {s['requests']} requests failed: {errors[:3]}")
    if s["requests"] - s["failed"] == 0:
        out.append("no request completed")
    growth = report.rss_growth_second_half()
    bound = max(0.0, baseline_rss_growth) + max_rss_growth
    if not growth < bound:
        base = f" = {baseline_rss_growth:.1%} of the engine alone + {max_rss_growth:.0%}"
        out.append(
            f"resident memory of the process holding lmcache grew {growth:.1%} over the second "
            f"half (bound {bound:.1%}{base if baseline_rss_growth > 0 else ''})"
        )
    pinned = value(end, "lmcache:pinned_chunks")
    if pinned:
        out.append(f"{pinned:.0f} chunks still pinned after the load ended")
    expired = value(end, "lmcache:num_expired_pins")
    if expired:
        out.append(f"{expired:.0f} pins expired (a request left its pins behind)")
    hit, asked = value(end, "lmcache:num_hit_tokens"), value(end, "lmcache:num_requested_tokens")
    if hit > asked:
        out.append(f"retrieved {hit:.0f} tokens of {asked:.0f} asked for")
    if hit == 0:
        out.append("no token was retrieved: the soak did not exercise loads")
    lookup_hits = value(end, "lmcache:num_lookup_hits")
    if lookup_hits > value(end, "lmcache:num_lookup_tokens"):
        out.append("more lookup hits than tokens looked up")
    # DRAM holds what was stored plus what was promoted up from lower tiers.
    extra = value(end, "lmcache:stored_bytes", tier="cpu") - kv_bytes_per_token * value(
        end, "lmcache:num_stored_tokens"
    )
    promoted_max = value(end, "lmcache:num_promotions") * chunk_size * kv_bytes_per_token
    if not 0 <= extra <= promoted_max or extra % kv_bytes_per_token:
        out.append(
            f"DRAM tier bytes stored do not match the tokens stored ({kv_bytes_per_token} bytes "
            f"per token) plus {value(end, 'lmcache:num_promotions'):.0f} promoted chunks"
        )
    for tier in tiers(end):
        used = value(end, "lmcache:usage_bytes", tier=tier)
        cap = value(end, "lmcache:capacity_bytes", tier=tier)
        if cap and used > cap:
            out.append(f"tier {tier} holds {used:.0f} bytes, above its capacity {cap:.0f}")
        for bad in ("num_corrupt_chunks", "num_forged_chunks"):
            if value(end, f"lmcache:{bad}", tier=tier):
                out.append(f"tier {tier}: {bad} = {value(end, f'lmcache:{bad}', tier=tier):.0f}")
    read_kv = value(end, "lmcache:num_failures", op="read_kv")
    if read_kv:
        out.append(f"{read_kv:.0f} stores could not read KV from the engine")
    if recovered_tier is not None and recovered_at_s is not None:
        _, _, then = report.at(recovered_at_s)
        got = value(end, "lmcache:retrieved_bytes", tier=recovered_tier) - value(
            then, "lmcache:retrieved_bytes", tier=recovered_tier
        )
        health = [
            v
            for (n, lab), v in end.items()
            if n == "lmcache:tier_healthy" and ("tier", recovered_tier) in lab
        ]
        if not health or min(health) < 1:
            out.append(f"tier {recovered_tier} is still marked unhealthy at the end")
        if got <= 0:
            out.append(f"tier {recovered_tier} served no hit after it came back")
        after = value(end, "lmcache:num_hit_tokens") - value(then, "lmcache:num_hit_tokens")
        if after <= 0:
            out.append("no hit at all after the fault ended")
    return out
