"""Upstream LMCache's MP mode against ours and vLLM alone, in one run: hit and uncached TTFT.

The driver of :mod:`lmcache_vllm.bench.upstream_mp` (issue 31's comparison;
what is run and how it is paired is described there): vLLM alone, this
repository's ``lmcache server`` with vLLM's ``LMCacheMPConnector``, and
upstream LMCache 0.5.6's server and connector from the separate venv that
``tools/setup_upstream.sh`` makes (default ``/work/upstream-venv``), at each
chunk size (``--chunk-sizes``), on the same random ~200M Llama and the same
4000-token prompts.

Here (2 cores, float32) an uncached 4000-token prompt takes 24-35 s and its
paired ratios spread by about 10% either way, so 4 documents resolve the hit
ratios well but not a 2% difference in uncached TTFT; 4 documents at two chunk
sizes take about 19 minutes. ``--report`` prints a saved ``--json`` run again.

    python tools/bench_upstream_mp.py                       # 4 documents, chunks 256 and 128
    python tools/bench_upstream_mp.py --docs 8 --json upstream-mp.json
    python tools/bench_upstream_mp.py --chunk-sizes 256 --upstream-venv /elsewhere

Exit status: 0; 1 with the reason if a server did not start, a request failed
or a hit did not hit; 2 if the upstream venv is missing or has no upstream
LMCache 0.5.6 (``bash tools/setup_upstream.sh`` makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lmcache_core.bench.client import BenchmarkFailed
from lmcache_vllm.bench.upstream_mp import (
    UPSTREAM_VERSION,
    UpstreamMissing,
    check_upstream,
    measure,
    summarize,
)
from lmcache_vllm.testing import tool_args
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_UPSTREAM_VENV = os.environ.get("LMCACHE_UPSTREAM_VENV", "/work/upstream-venv")


def report(console: Console, s: dict[str, Any], title: str) -> None:
    t = Table(title=title)
    for col in ("configuration", "uncached (s)", "hit (s)", "hit tokens/request"):
        t.add_column(col, justify="right")
    for name, c in s["configs"].items():
        t.add_row(name, f"{c['uncached_median_s']:.3f}", f"{c['hit_median_s']:.3f}",
                  f"{c['hit_tokens_per_request']:.0f}")  # fmt: skip
    console.print(t)
    p = Table(title="paired ratios (same document, seconds apart)")
    for col in ("ratio", "median", "IQR", "min-max", "n"):
        p.add_column(col, justify="right")
    for name, r in s["paired"].items():
        p.add_row(name, f"{r['median']:.3f}", f"{r['q1']:.3f}-{r['q3']:.3f}",
                  f"{r['lo']:.3f}-{r['hi']:.3f}", str(r["n"]))  # fmt: skip
    console.print(p)
    for claim, c in s["claims"].items():
        console.print(f"{claim}: {'yes' if c['holds'] else 'NO'}; paired {c['evidence']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tool_args.add_arguments(ap, model="random")
    ap.add_argument("--docs", type=int, default=4, help="documents per chunk size")
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--chunk-sizes", default="256,128", help="comma-separated")
    ap.add_argument("--l1-gb", type=float, default=2.0, help="each cache server's DRAM, GiB")
    ap.add_argument("--settle", type=float, default=1.2, help="pause before each request, s")
    ap.add_argument(
        "--upstream-venv", default=DEFAULT_UPSTREAM_VENV,
        help=f"the venv with upstream LMCache {UPSTREAM_VERSION} (default: %(default)s, "
        "or $LMCACHE_UPSTREAM_VENV)",
    )  # fmt: skip
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--report", metavar="JSON", help="print the figures of a saved --json run")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        phases = {int(c): ph for c, ph in saved["phases"].items()}
        report(Console(), summarize(phases), f"TTFT, {saved['prompt_tokens']}-token prompts, "
               f"{saved['dtype']}, {saved['docs']} docs per chunk size (medians)")  # fmt: skip
        return 0
    venv = Path(args.upstream_venv)
    try:
        versions = check_upstream(venv)
    except UpstreamMissing as e:
        setup = f"UPSTREAM_VENV={venv} " if str(venv) != "/work/upstream-venv" else ""
        print(
            f"{Path(sys.argv[0]).name}: {e}.\nMake it with:  {setup}bash "
            f"{ROOT / 'tools' / 'setup_upstream.sh'}",
            file=sys.stderr,
        )
        return 2
    run_ = tool_args.prepare(args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-upmp-")
    chunks = [int(c) for c in args.chunk_sizes.split(",")]
    console = Console()
    console.print(f"logs: {run_.out}; upstream: {venv} ({versions})")
    t0 = time.monotonic()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("starting", total=args.docs * len(chunks))
        phases = measure(
            run_, venv, chunk_sizes=chunks, docs=args.docs, prompt_tokens=args.prompt_tokens,
            l1_gb=args.l1_gb, settle_s=args.settle,
            on_doc=lambda msg: progress.update(task, description=msg, advance=1),
        )  # fmt: skip
    wall_s = time.monotonic() - t0
    problems = [x for ph in phases.values() for x in ph.pop("problems")]
    s = summarize(phases)
    report(console, s, f"TTFT, {args.prompt_tokens}-token prompts, {run_.dtype}, "
                       f"{args.docs} docs per chunk size (medians)")  # fmt: skip
    out = {
        "model": run_.model, "dtype": run_.dtype, "prompt_tokens": args.prompt_tokens,
        "docs": args.docs, "chunk_sizes": chunks, "upstream_venv": str(venv),
        "upstream_versions": versions, "settle_s": args.settle, "l1_gb": args.l1_gb,
        **s, "problems": problems, "phases": {str(k): v for k, v in phases.items()},
        "logs": str(run_.out), "wall_s": round(wall_s, 1),
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if problems:
        raise BenchmarkFailed("; ".join(problems))
    return 0


if __name__ == "__main__":
    sys.exit(tool_args.run_tool(main))
