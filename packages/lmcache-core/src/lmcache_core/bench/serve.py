"""``lmcache bench serve``: a workload against any OpenAI-compatible server, the figures shown.

``--workload long-doc-qa`` (:func:`cmd_long_doc_qa`) asks each long document
``--passes`` times and prints TTFT per pass. ``--workload multi-round-qa``
(:func:`cmd_load`) runs the load generator and prints a table (TTFT and ITL
percentiles, throughput, hit rate read from the server's ``/metrics``), writes
everything as JSON (``--out``: the summary and every request) and, where a
person would rather look than read, an SVG of TTFT over time (``--plot``);
``lmcache bench plot a.json b.json -o cmp.svg`` draws several runs
(configurations) on one chart. Either exits 1, with the servers' reasons, when
a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

from lmcache_core.bench import svg
from lmcache_core.bench.client import OpenAIClient, PassResult, failure_summary, run_passes
from lmcache_core.bench.loadgen import LoadSpec, hit_rate, run_load, samples_json, summarize
from lmcache_core.bench.scrape import scrape_metrics
from lmcache_core.bench.workload import long_doc_qa


def _scrape(url: str | None) -> dict[str, float]:
    if not url:
        return {}
    try:
        return scrape_metrics(url, prefix="")
    except (OSError, ValueError):
        return {}  # no /metrics, or not Prometheus's: no hit rate, not a failed run


def cmd_load(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    spec = LoadSpec(
        users=args.users,
        rounds=args.rounds,
        context_words=args.context_words,
        system_words=args.system_words,
        question_words=args.question_words,
        answer_tokens=args.max_tokens,
        concurrency=args.concurrency,
        rate=args.rate,
        seed=args.seed,
        duration_s=getattr(args, "duration", None),
    )
    metrics_url = args.metrics_url or f"{args.base_url.rstrip('/')}/metrics"
    before = _scrape(metrics_url)
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(
            f"{spec.users} users x {spec.rounds} rounds, concurrency {spec.concurrency}"
            + (f", {spec.rate} req/s" if spec.rate else ""),
            total=spec.users * spec.rounds,
        )
        samples, wall, model = asyncio.run(
            run_load(args.base_url, spec, args.model, lambda _s: progress.advance(task))
        )
    summary = summarize(samples, wall)
    summary["hit_rate"] = hit_rate(before, _scrape(metrics_url))
    result: dict[str, Any] = {
        "label": args.label or args.base_url,
        "model": model,
        "spec": spec.__dict__,
        "summary": summary,
        # The per-round view the earlier sequential client printed.
        "passes": [{"name": f"round {r['round']}", **r} for r in summary["rounds"]],
    }
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "samples": samples_json(samples)}))
    if args.plot:
        write_ttft_svg(Path(args.plot), {result["label"]: samples_json(samples)})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        table = Table(title=f"{model}: {summary['requests']} requests in {wall:.1f} s")
        for col in ("", "p50", "p90", "p99", "mean"):
            table.add_column(col, justify="left" if not col else "right")
        for name in ("ttft_s", "itl_s", "e2e_s"):
            p = summary[name]
            table.add_row(name, *(f"{p[k]:.3f}" for k in ("p50", "p90", "p99", "mean")))
        Console().print(table)
        rates = ", ".join(f"{k} {v:.0%}" for k, v in summary["hit_rate"].items()) or "n/a"
        print(
            f"{summary['request_throughput']:.3f} req/s, "
            f"{summary['output_token_throughput']:.1f} output tok/s, "
            f"{summary['input_token_throughput']:.0f} prompt tok/s; "
            f"{summary['failed']} failed; hit rate: {rates}"
        )
    failures = failure_summary(samples)
    if failures:
        print(f"lmcache: {failures}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``lmcache bench serve``: the workload ``args.workload`` names."""
    if args.workload == "multi-round-qa":
        return cmd_load(args)
    return cmd_long_doc_qa(args)


def cmd_long_doc_qa(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    client = OpenAIClient(args.base_url, args.model)
    docs = long_doc_qa(args.docs, args.doc_words, seed=args.seed)
    passes = [(f"pass {p + 1}", docs) for p in range(args.passes)]
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(
            f"{args.workload} against {args.base_url}", total=sum(len(p) for _, p in passes)
        )
        results: list[PassResult] = run_passes(
            client,
            passes,
            max_tokens=args.max_tokens,
            on_request=lambda _r: progress.advance(task),
        )
    summary: dict[str, object] = {
        "model": client.model,
        "passes": [
            {
                "name": p.name,
                "requests": len(p.requests),
                "errors": len(p.requests) - len(p.ok),
                "median_ttft_s": p.median_ttft(),
                "mean_ttft_s": p.mean_ttft(),
                "mean_prompt_tokens": p.prompt_tokens(),
            }
            for p in results
        ],
    }
    if args.metrics_url:
        summary["lmcache"] = scrape_metrics(args.metrics_url)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        table = Table(title=f"{args.workload}: TTFT per pass ({client.model})")
        for col in ("pass", "requests", "median TTFT (s)", "mean TTFT (s)", "prompt tokens"):
            table.add_column(col, justify="left" if col == "pass" else "right")
        for p in results:
            table.add_row(
                p.name,
                str(len(p.ok)),
                f"{p.median_ttft():.3f}",
                f"{p.mean_ttft():.3f}",
                f"{p.prompt_tokens():.0f}",
            )
        Console().print(table)
        if "lmcache" in summary:
            m = summary["lmcache"]
            assert isinstance(m, dict)
            looked = m.get("lmcache:num_lookup_tokens", 0)
            rate = m.get("lmcache:num_lookup_hits", 0) / looked if looked else 0.0
            stored = m.get("lmcache:stored_bytes", 0) / 2**20
            print(f"lmcache hit rate {rate:.0%}; stored {stored:.0f} MiB")
    failures = failure_summary([r for p in results for r in p.requests])
    if failures:
        print(f"lmcache: {failures}", file=sys.stderr)
        return 1
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    runs = {}
    for path in args.runs:
        data = json.loads(Path(path).read_text())
        label = str(data.get("label") or path)
        if label in runs:  # two runs of one configuration: keep both
            label = f"{label} ({path})"
        runs[label] = data.get("samples", [])
    write_ttft_svg(Path(args.output), runs)
    print(f"wrote {args.output}")
    return 0


def write_ttft_svg(path: Path, runs: dict[str, list[dict[str, Any]]]) -> None:
    """TTFT (seconds) against request start (seconds into the run), one series per run."""
    w, h, left, bottom, top, right = 720, 400, 60, 40, 30, 170
    points = {
        label: [
            (s["start_s"], s["ttft_s"])
            for s in samples
            if s.get("error") is None and math.isfinite(s["ttft_s"])
        ]
        for label, samples in runs.items()
    }
    xs = [x for pts in points.values() for x, _ in pts] or [1.0]
    ys = [y for pts in points.values() for _, y in pts] or [1.0]
    xmax, ymax = max(max(xs), 1e-9), max(max(ys), 1e-9)

    def sx(x: float) -> float:
        return left + (w - left - right) * x / xmax

    def sy(y: float) -> float:
        return h - bottom - (h - bottom - top) * y / ymax

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{left}" y="18">TTFT over time</text>',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
        f'<text x="{(w - right) / 2}" y="{h - 8}">request start (s), 0 to {xmax:.0f}</text>',
        f'<text x="8" y="{top - 8}">TTFT (s), 0 to {ymax:.2f}</text>',
    ]
    for i, (label, pts) in enumerate(points.items()):
        color = svg.color(i)
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>')
        ly = top + 16 * i
        out.append(f'<rect x="{w - right + 10}" y="{ly}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{w - right + 26}" y="{ly + 9}">{svg.escape(label)}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))
