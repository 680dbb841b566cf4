"""Non-prefix reuse (blending) in real vLLM: answer quality, TTFT, and the cost for others.

The driver of :mod:`lmcache_vllm.bench.blend` (the measurements). Three
measurements, each against its baseline in the same process (vLLM's offline
API, the real SmolLM2-135M model by default, in the dtype the CPU runs
fastest):

* quality: a synthetic multi-document QA set (lmcache_vllm.testing.qa_sets). The
  documents are first stored in another order (or each on its own, with
  ``--warm alone``), then asked about in a new order. Greedy answers from a
  full prefill, from a blend at the configured ratio and from a blend at
  ratio 0 (re-rotation only) are scored against the ground truth, and the
  blends' answers against the full prefill's; the KL divergence of the first
  answer token's distribution from the full prefill's measures what greedy
  answers hide;
* speed: 4 cached documents of about 1000 tokens in a new order and a short
  question: TTFT of the blend against a full prefill of the same prompt
  (a fresh cache salt makes it a miss), alternating;
* cost for everyone else: uncached requests with blending on against
  blending off, alternating in one engine (the scheduler's blending is
  switched per request, so both paths store what they would).

* curves: quality on the hard QA sets and TTFT over the recompute budget, per
  selection policy (lmcache_vllm.bench.blend_curves), with an SVG plot.

    python tools/bench_blend.py                      # the first three, about 15 min here
    python tools/bench_blend.py --only speed --trials 5
    python tools/bench_blend.py --only curves --items 20 --plot curves.svg --json curves.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("LMCACHE_MAX_LOCAL_CPU_SIZE", "3GiB")

from lmcache_core.config import CacheConfig
from lmcache_vllm.bench.blend import Bench, overhead, quality, speed
from lmcache_vllm.bench.blend_curves import (
    BUDGETS,
    TARGETS,
    quality_curves,
    ttft_curves,
    write_curves_svg,
)
from lmcache_vllm.bench.blend_curves import POLICIES as CURVE_POLICIES
from lmcache_vllm.testing import tool_args
from lmcache_vllm.testing.qa_sets import HARD_SETS
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tool_args.add_arguments(ap, model="smollm2", out=False)
    ap.add_argument("--only", choices=["quality", "speed", "overhead", "curves"], action="append")
    ap.add_argument("--items", type=int, default=50, help="quality items")
    ap.add_argument("--warm", choices=["reordered", "alone"], default="reordered")
    ap.add_argument(
        "--set",
        choices=["facts", "linked"],
        default="facts",
        help="facts: one fact per document; linked: a fact and its person in two passages",
    )
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--ratio",
        default=",".join(map(str, CacheConfig().blend_recompute_ratios)),
        help="comma-separated, one per check layer (non-increasing); default: the config's",
    )
    ap.add_argument(
        "--check-layer", default="1", help="comma-separated: several narrow the set layer by layer"
    )
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--sets", default=",".join(HARD_SETS), help="curves: QA sets")
    ap.add_argument("--policies", default=",".join(CURVE_POLICIES), help="curves: policies")
    ap.add_argument("--seed", type=int, default=11, help="curves: the items' seed")
    ap.add_argument("--plot", help="curves: write the agreement curves here (SVG)")
    ap.add_argument("--no-ttft", action="store_true", help="curves: quality only")
    ap.add_argument("--no-quality", action="store_true", help="curves: TTFT only")
    ap.add_argument(
        "--budgets", default=",".join(map(str, BUDGETS)), help="curves: fixed ratios to measure"
    )
    ap.add_argument(
        "--targets", default=",".join(map(str, TARGETS)), help="curves: adaptive targets"
    )
    a = ap.parse_args()
    run_ = tool_args.prepare(a, models_dir=ROOT / ".cache" / "models", prefix="lmcache-blend-")
    model = run_.model
    ratios = tuple(float(x) for x in a.ratio.split(","))
    checks = tuple(int(x) for x in a.check_layer.split(","))
    if len(ratios) != len(checks):
        ap.error("--ratio and --check-layer need as many values each")
    b = Bench(model, ratios, checks, dtype=run_.dtype)
    todo = a.only or ["quality", "speed", "overhead"]
    out: dict = {
        "model": model,
        "dtype": run_.dtype,
        "ratio": list(ratios),
        "check_layer": list(checks),
    }
    for name in todo:
        console.print(f"[bold]{name}[/bold]")
        if name == "quality":
            with Progress(console=console, transient=True) as bar:

                def progress(total: int) -> Callable[[], None]:
                    task = bar.add_task("quality", total=total)
                    return lambda: bar.advance(task)

                out[name] = quality(b, a.items, a.warm, a.set, progress)
        elif name == "curves":
            out[name] = curves(b, a)
        elif name == "speed":
            out[name] = speed(b, a.trials, console.print)
        else:
            out[name] = overhead(b, 4 * a.trials)
    table = Table(title=f"blending, ratio {a.ratio}, check layer {a.check_layer}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if "quality" in out:
        q = out["quality"]
        for k, v in q["accuracy"].items():
            table.add_row(f"accuracy, {k}", f"{v:.0%}")
        for k, v in q["agreement_with_full"].items():
            table.add_row(f"answers = full prefill's, {k}", f"{v:.0%}")
        for k, v in q["first_token_kl"].items():
            table.add_row(f"first-token KL to full prefill, {k}", f"{v:.3f}")
    if "speed" in out:
        s = out["speed"]
        table.add_row(
            f"TTFT full prefill ({s['prompt_tokens']:.0f} tok)", f"{s['full_ttft_s']:.2f} s"
        )
        table.add_row("TTFT blended", f"{s['blend_ttft_s']:.2f} s")
        table.add_row("blended / full (of the medians)", f"{s['ratio']:.3f}")
        p = s["paired_ratio"]
        table.add_row(
            f"blended / full, paired (IQR, n={p['n']})",
            f"{p['median']:.3f} ({p['q1']:.3f}-{p['q3']:.3f})",
        )
    if "overhead" in out:
        o = out["overhead"]
        table.add_row("uncached TTFT, blending off", f"{o['off_ttft_s']:.2f} s")
        table.add_row("uncached TTFT, blending on", f"{o['on_ttft_s']:.2f} s")
        p = o["paired_ratio"]
        table.add_row(
            f"on / off (median of {o['pairs']} pairs, IQR)",
            f"{o['ratio']:.3f} ({p['q1']:.3f}-{p['q3']:.3f})",
        )
    console.print(table)
    if "curves" in out:
        print_curves(out["curves"])
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    os._exit(0)  # skip vLLM's slow teardown


def curves(b: Bench, a: argparse.Namespace) -> dict:
    sets = [s for s in a.sets.split(",") if s]
    policies = [p for p in a.policies.split(",") if p]
    bad = [p for p in policies if p not in CURVE_POLICIES]
    if bad:
        raise SystemExit(f"unknown policies {bad}: from {', '.join(CURVE_POLICIES)}")
    budgets = [float(x) for x in a.budgets.split(",") if x]
    targets = [float(x) for x in a.targets.split(",") if x]
    out: dict = {"seed": a.seed, "budgets": budgets, "targets": targets}
    with Progress(console=console, transient=True) as bar:
        if not a.no_quality:
            task = bar.add_task("quality curves", total=a.items * len(sets))
            out["quality"] = quality_curves(
                b,
                sets,
                a.items,
                a.seed,
                policies,
                budgets,
                targets,
                advance=lambda: bar.advance(task),
            )
        if not a.no_ttft:
            task = bar.add_task("TTFT curves", total=a.trials)
            out["ttft"] = ttft_curves(
                b, policies, a.trials, budgets, targets, advance=lambda: bar.advance(task)
            )
    if a.plot and "quality" in out:
        write_curves_svg(Path(a.plot), out["quality"])
    return out


def print_curves(c: dict) -> None:
    ttft = {(p["policy"], p["x"]): p["ttft_vs_full"] for p in c.get("ttft", [])}
    if "quality" not in c and ttft:
        t = Table(title="TTFT over a full prefill of the same prompt")
        for col in ("policy", "budget", "recomputed", "TTFT/full"):
            t.add_column(col, justify="left" if col == "policy" else "right")
        for p in sorted(c["ttft"], key=lambda p: (p["policy"], p["x"])):
            t.add_row(
                p["policy"], f"{p['x']:g}", f"{p['recomputed']:.2f}", f"{p['ttft_vs_full']:.2f}"
            )
        console.print(t)
    for set_name, q in c.get("quality", {}).items():
        t = Table(
            title=f"{set_name}: {q['items']} items, full prefill {q['full_accuracy']:.0%} correct"
        )
        for col in ("policy", "budget", "recomputed", "= full", "correct", "KL", "TTFT/full"):
            t.add_column(col, justify="left" if col == "policy" else "right")
        for p in sorted(q["points"], key=lambda p: (p["policy"], p["x"])):
            r = ttft.get((p["policy"], p["x"]))
            t.add_row(
                p["policy"],
                f"{p['x']:g}",
                f"{p['recomputed']:.2f}",
                f"{p['agreement']:.0%}",
                f"{p['accuracy']:.0%}",
                f"{p['kl']:.3f}",
                "" if r is None else f"{r:.2f}",
            )
        console.print(t)


if __name__ == "__main__":
    main()
